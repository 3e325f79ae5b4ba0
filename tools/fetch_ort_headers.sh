#!/usr/bin/env bash
# Fetches the ONNX Runtime C/C++ headers. The onnxruntime wheel ships none, so they come from Debian's
# libonnxruntime-dev (suite trixie), downloaded and unpacked into a private folder: nothing is installed
# and the system's apt sources stay untouched. The C API is backward compatible, so 1.21 headers work
# with the newer runtime in the wheel.
# Prints the include directory on stdout; every other message goes to stderr.
set -euo pipefail
dest="${1:-$(cd "$(dirname "$0")/.." && pwd)/build/ort-headers}"
inc="$dest/usr/include/onnxruntime"
if [ -f "$inc/onnxruntime_c_api.h" ]; then echo "$inc"; exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$dest"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
opts=(-o "Dir::Etc::sourcelist=$work/sources.list" -o "Dir::Etc::sourceparts=-"
      -o "Dir::State::Lists=$work/lists" -o "Dir::Cache::archives=$work/archives"
      -o "APT::Get::List-Cleanup=0")
apt-get "${opts[@]}" update >&2
(cd "$work" && apt-get "${opts[@]}" download libonnxruntime-dev >&2)
dpkg-deb -x "$work"/libonnxruntime-dev_*.deb "$dest"
test -f "$inc/onnxruntime_c_api.h" || { echo "libonnxruntime-dev did not contain onnxruntime_c_api.h" >&2; exit 1; }
echo "$inc"
