"""The kernels under AddressSanitizer + UndefinedBehaviorSanitizer: custom_ops/ configured with RBE_SANITIZE=ON
(no ORT op, no Python module) and custom_ops/tests/sanitize_driver.cc run on it. The driver covers
prepare_weight on valid and invalid inputs and gemm for every bits / block_size / ISA with M = 1, 3, 17 and
K not a multiple of the block size, SIMD against scalar against a double-precision reference."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from cmake_build import cmake_build

REPO = Path(__file__).resolve().parents[1]
CUSTOM_OPS = REPO / "custom_ops"
SANITIZER_REPORT = re.compile(r"AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:|"
                              r"==\d+==ERROR")


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("sanitize-build")
    # Debug (-O0 -g): a third of the RelWithDebInfo build time, exact line numbers in reports; the run is short.
    cmake_build(CUSTOM_OPS, build, "-DCMAKE_BUILD_TYPE=Debug", "-DRBE_SANITIZE=ON", "-DRBE_BUILD_ORT_OP=OFF",
                "-DRBE_BUILD_PYTHON=OFF", target="rbe_sanitize_driver")
    return build / "rbe_sanitize_driver"


def test_driver_is_instrumented(driver):
    """Guards against a vacuous pass: the binary really carries the ASan and UBSan runtimes' hooks."""
    blob = driver.read_bytes()
    assert b"__asan_report" in blob or b"AddressSanitizer" in blob, "driver built without -fsanitize=address"
    assert b"__ubsan_handle" in blob, "driver built without -fsanitize=undefined"


def test_kernels_are_clean_under_asan_and_ubsan(driver):
    env = dict(os.environ,
               ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:detect_stack_use_after_return=1:strict_string_checks=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    out = subprocess.run([str(driver)], capture_output=True, text=True, timeout=300, env=env)
    print(out.stdout[-2000:])
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}"
    assert "sanitize_driver: ok" in out.stdout
    report = SANITIZER_REPORT.search(out.stderr)
    assert report is None, out.stderr[-6000:]
