#!/usr/bin/env bash
# Installs what tests/test_fuzz.py needs: clang with libFuzzer and the ASan/UBSan runtimes (Debian's clang
# plus libclang-rt-<ver>-dev, which holds libclang_rt.fuzzer*.a). Idempotent: does nothing when a clang++ that
# can link -fsanitize=fuzzer is already on PATH. Needs root (or sudo) and apt-get.
set -euo pipefail

can_fuzz() {
  local cxx="$1" tmp
  command -v "$cxx" >/dev/null 2>&1 || return 1
  tmp="$(mktemp -d)"
  printf '#include <cstdint>\n#include <cstddef>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t){return 0;}\n' \
    > "$tmp/f.cc"
  if "$cxx" -fsanitize=fuzzer,address,undefined "$tmp/f.cc" -o "$tmp/f" >/dev/null 2>&1; then
    rm -rf "$tmp"; return 0
  fi
  rm -rf "$tmp"; return 1
}

for cxx in clang++ clang++-19 clang++-16 clang++-14; do
  if can_fuzz "$cxx"; then echo "install_fuzz_deps: $cxx already links libFuzzer" >&2; exit 0; fi
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=900 update -q >&2
# The default clang of the release, and the compiler-rt dev package of the same major version.
ver="$(apt-cache policy clang | sed -n 's/^ *Candidate: *[0-9]*:\([0-9]*\)\..*/\1/p')"
pkgs=(clang)
if [ -n "$ver" ] && apt-cache show "libclang-rt-$ver-dev" >/dev/null 2>&1; then
  pkgs+=("libclang-rt-$ver-dev")
fi
$SUDO apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends "${pkgs[@]}" >&2
can_fuzz clang++ || { echo "install_fuzz_deps: clang++ still cannot link -fsanitize=fuzzer" >&2; exit 1; }
echo "install_fuzz_deps: installed ${pkgs[*]}" >&2
