"""libFuzzer run of the kernel-creation path (custom_ops/fuzz/fuzz_prepare.cc): rbe::prepare_weight on
carved-up attributes, seeds, codes and exact-outlier records, and scalar vs best-ISA gemm (accuracy_level 0, and
4 where the input asks for it) on what it accepts, under ASan + UBSan; and of the Rice-coded table reader
(custom_ops/fuzz/fuzz_rice.cc, FORMAT.md §5.4) from tables the numpy encoder writes.

Needs clang++ with libFuzzer (`bash tools/install_fuzz_deps.sh`, run by `make setup`). The fuzzer is built from
the checkout's custom_ops/ in a temporary folder and run for RBE_FUZZ_SECONDS (default 60) on the committed
seed corpus custom_ops/fuzz/corpus/ (read only: new inputs go to a temporary folder).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cmake_build import cmake_build

REPO = Path(__file__).resolve().parents[1]
CUSTOM_OPS = REPO / "custom_ops"
CORPUS = CUSTOM_OPS / "fuzz" / "corpus"
FUZZ_SECONDS = int(os.environ.get("RBE_FUZZ_SECONDS", "60"))
CLANGS = ("clang++", "clang++-19", "clang++-16", "clang++-15", "clang++-14")


def find_clang() -> str | None:
    return next((path for name in CLANGS if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def fuzz_build(tmp_path_factory) -> Path:
    """Both fuzz targets, built once (rbe_core under ASan and UBSan takes most of two minutes)."""
    clang = find_clang()
    if clang is None:
        pytest.fail("clang++ not found: the fuzz test needs clang with libFuzzer; install it with "
                    "`bash tools/install_fuzz_deps.sh` (part of `make setup`)", pytrace=False)
    build = tmp_path_factory.mktemp("fuzz-build")
    cmake_build(CUSTOM_OPS, build, f"-DCMAKE_CXX_COMPILER={clang}", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                "-DRBE_BUILD_FUZZ=ON", "-DRBE_BUILD_ORT_OP=OFF", "-DRBE_BUILD_PYTHON=OFF",
                target=["rbe_fuzz_prepare", "rbe_fuzz_rice"],
                hints={"fuzzer": "libFuzzer missing? run `bash tools/install_fuzz_deps.sh`"})
    return build


@pytest.fixture(scope="module")
def fuzzer(fuzz_build) -> Path:
    return fuzz_build / "rbe_fuzz_prepare"


def _run_fuzzer(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    # libFuzzer's -rss_limit_mb reads the peak RSS from getrusage, which Linux carries from the parent across
    # fork and exec: launched straight from a pytest process that has grown past 4 GB (the model tests before
    # this one), the fuzzer reported "out-of-memory" within a second. As the child of a small shell it
    # starts from its own memory.
    return subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *cmd], capture_output=True, text=True, timeout=timeout)


def test_seed_corpus_verdicts(fuzzer):
    """Every committed input runs once: valid-* are accepted (and their gemm checks pass), invalid-* rejected."""
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 20, f"seed corpus {CORPUS} looks empty: python custom_ops/fuzz/make_corpus.py"
    out = subprocess.run([str(fuzzer), *map(str, files)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, RBE_FUZZ_VERBOSE="1"))
    assert out.returncode == 0, out.stderr[-6000:]
    verdicts = {}
    current = None
    for line in out.stderr.splitlines():
        if m := re.match(r"Running: (.*)$", line):
            current = Path(m.group(1)).name
        elif (m := re.match(r"RBE_FUZZ (accepted|rejected)", line)) and current:
            verdicts[current] = m.group(1)
    assert set(verdicts) == {f.name for f in files}, out.stderr[-3000:]
    wrong = {name: v for name, v in verdicts.items()
             if (name.startswith("valid-") and v != "accepted") or (name.startswith("invalid-") and v != "rejected")}
    assert not wrong, wrong


def test_fuzzing_finds_no_crash(fuzzer, tmp_path):
    work = tmp_path / "new-inputs"
    work.mkdir()
    cmd = [str(fuzzer), str(work), str(CORPUS), f"-max_total_time={FUZZ_SECONDS}", "-max_len=4096", "-timeout=30",
           "-rss_limit_mb=4096", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"]
    out = _run_fuzzer(cmd, FUZZ_SECONDS + 120)
    log = out.stderr
    stats = dict(re.findall(r"stat::(\w+):\s+(\d+)", log))
    cov = re.findall(r"cov: (\d+)", log)
    print(f"\nfuzzed {FUZZ_SECONDS} s: {stats.get('number_of_executed_units')} inputs, "
          f"{stats.get('average_exec_per_sec')}/s, coverage {cov[-1] if cov else '?'} edges, "
          f"{stats.get('new_units_added')} new inputs, peak RSS {stats.get('peak_rss_mb')} MB")
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    report = re.search(r"(==\d+==ERROR.*|fuzz_prepare: .*|SUMMARY: .*)", log)
    assert out.returncode == 0 and not crashes, (
        f"fuzzer failed (exit {out.returncode}), artifacts {crashes}: {report.group(0) if report else ''}\n"
        f"{log[-6000:]}")
    assert int(stats.get("number_of_executed_units", 0)) > 1000, log[-3000:]


def _rice_input(t) -> bytes:
    """A table from the numpy encoder in fuzz_rice.cc's input layout (K <= 600, N <= 48)."""
    import numpy as np

    valid = np.uint64(0xB2 << 56 | 4 << 16)
    masks = t.seeds.reshape(-1).view(np.uint64) ^ valid
    head = np.array([t.K - 1], "<u2").tobytes() + bytes([t.N - 1, 0]) + np.array([1.0], "<f4").tobytes()
    return head + masks.astype("<u8").tobytes() + t.lengths.astype("<u2").tobytes() + t.codes.tobytes()


def test_rice_reader_fuzzing_finds_no_crash(fuzz_build, tmp_path):
    """Valid tables (numpy encoder: offsets, escapes, k from 0 up) are accepted and decode as the fuzzer's own
    reading of §5.4; then FUZZ_SECONDS / 3 of mutations of them."""
    import numpy as np

    from rbe_onnx.codec import rice_encode

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i, (K, N, step) in enumerate([(1, 1, 1.0), (64, 8, 0.05), (300, 20, 0.01), (100, 48, 0.3), (17, 3, 1e-4)]):
        W = (rng.standard_normal((K, N)) * 0.05 + rng.uniform(-0.2, 0.2, N)).astype(np.float32)
        W[0, 0] = 3.0  # an escape, or a wide k
        (corpus / f"valid-{i}").write_bytes(_rice_input(rice_encode(W, step)))
    fuzzer = fuzz_build / "rbe_fuzz_rice"
    verdicts = subprocess.run([str(fuzzer), *map(str, sorted(corpus.iterdir()))], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, RBE_FUZZ_VERBOSE="1"))
    assert verdicts.returncode == 0 and verdicts.stderr.count("RBE_FUZZ accepted") == 5, verdicts.stderr[-3000:]
    seconds = max(10, FUZZ_SECONDS // 3)
    out = _run_fuzzer([str(fuzzer), str(corpus), f"-max_total_time={seconds}", "-max_len=8192", "-timeout=30",
                       "-rss_limit_mb=4096", "-print_final_stats=1", f"-artifact_prefix={tmp_path}/"], seconds + 120)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-")))
    assert out.returncode == 0 and not crashes, f"exit {out.returncode}, artifacts {crashes}\n{out.stderr[-6000:]}"
