"""Configures and builds one CMake target for the tests that drive C++ binaries (kernel test, sanitizer driver,
fuzzer, C++ app); a failed step fails the test with the tail of its output."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def cmake_build(source: Path, build: Path, *configure_args: str, target: str | list[str] | None = None,
                timeout: float | None = None, hints: dict[str, str] | None = None) -> None:
    """target: one target or several (default: all); hints: output substring -> advice appended to the failure
    message when the output contains it."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake not found (pip install -r requirements-dev.txt)", pytrace=False)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [cmake, "-S", str(source), "-B", str(build), *generator, *configure_args]
    targets = [target] if isinstance(target, str) else list(target or [])
    compile_ = [cmake, "--build", str(build), *(["--target", *targets] if targets else []), "-j", "2"]
    for cmd in (configure, compile_):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            text = out.stdout + out.stderr
            advice = "".join(f"\n({hint})" for key, hint in (hints or {}).items() if key in text)
            pytest.fail(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{out.stdout[-4000:]}\n"
                        f"{out.stderr[-4000:]}{advice}", pytrace=False)
