"""The C++ kernel test (custom_ops/tests/kernel_test.cc) natively and, for the NEON kernel, cross-compiled for
aarch64 and run under qemu-aarch64, so the ARM path is checked on an x86 CI machine.

Needs cmake, a native g++, aarch64-linux-gnu-g++ and qemu-aarch64; tools/install_cross_deps.sh installs the
last two (`make setup` runs it). A missing tool fails the test, never skips it: a silently skipped ARM test
would let a broken NEON kernel through.
"""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cmake_build import cmake_build

ROOT = Path(__file__).resolve().parents[1]
CUSTOM_OPS = ROOT / "custom_ops"
TOOLCHAIN = CUSTOM_OPS / "cmake" / "aarch64-linux-gnu.cmake"
INSTALL_HINT = "run tools/install_cross_deps.sh (as root, or with sudo) to install them"
SUMMARY = re.compile(r"kernel_test: (\d+) passed, (\d+) failed")
BUILD_TIMEOUT_S = 300
RUN_TIMEOUT_S = 300


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _build_kernel_test(build_dir: Path, *extra_args: str) -> Path:
    """Configures custom_ops with only rbe_core, rbe_kernel_test and the GEMV micro-benchmark (built so that it
    keeps compiling on both architectures; BENCHMARKS.md runs it) and builds them with -j2."""
    cmake_build(CUSTOM_OPS, build_dir, "-DCMAKE_BUILD_TYPE=Release", "-DRBE_BUILD_TESTS=ON", "-DRBE_BUILD_BENCH=ON",
                "-DRBE_BUILD_ORT_OP=OFF", "-DRBE_BUILD_PYTHON=OFF", *extra_args,
                target=["rbe_kernel_test", "rbe_gemv_bench"], timeout=BUILD_TIMEOUT_S)
    binary = build_dir / "rbe_kernel_test"
    assert binary.is_file() and (build_dir / "rbe_gemv_bench").is_file(), f"build succeeded but {binary} is missing"
    return binary


def _check_output(proc: subprocess.CompletedProcess, expect_isa: str | None) -> None:
    out = proc.stdout + proc.stderr
    summary = SUMMARY.search(out)
    assert summary, f"no summary line from rbe_kernel_test (rc {proc.returncode}):\n{out[-4000:]}"
    passed, failed = int(summary.group(1)), int(summary.group(2))
    assert proc.returncode == 0 and failed == 0, f"rbe_kernel_test: {failed} failed (rc {proc.returncode}):\n{out[-6000:]}"
    assert passed > 0
    if expect_isa is not None:
        isas = re.search(r"kernel_test: ISAs: (.*)", out)
        assert isas and expect_isa in isas.group(1).split(), \
            f"the {expect_isa} kernel was not exercised:\n{out[-2000:]}"


def _host_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\bavx2\b", flags)) and bool(re.search(r"\bfma\b", flags))


def test_kernel_test_native(tmp_path):
    """Scalar vs the host's SIMD kernel (AVX2 on x86 with AVX2+FMA, NEON on aarch64)."""
    _require("cmake")
    binary = _build_kernel_test(tmp_path / "native")
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        expect = "avx2" if _host_has_avx2_fma() else None
    elif machine in ("aarch64", "arm64"):
        expect = "neon"
    else:
        expect = None
    _check_output(_run([str(binary)], RUN_TIMEOUT_S), expect)


def test_kernel_test_aarch64_under_qemu(tmp_path):
    """Scalar vs NEON, cross-compiled (static) for aarch64 and run under qemu-aarch64."""
    _require("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")
    binary = _build_kernel_test(tmp_path / "aarch64", f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}")
    file_header = binary.read_bytes()[:20]
    # ELF e_machine (offset 18, little-endian) 0xB7 = EM_AARCH64: make sure we are not running a host binary.
    assert file_header[:4] == b"\x7fELF" and file_header[18:20] == b"\xb7\x00", "not an aarch64 ELF"
    env = {**os.environ, "QEMU_LD_PREFIX": "/usr/aarch64-linux-gnu"}  # only used if the link was not static
    proc = subprocess.run(["qemu-aarch64", str(binary)], capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                          env=env)
    _check_output(proc, "neon")
