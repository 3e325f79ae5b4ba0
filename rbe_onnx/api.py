"""Running RBE models from your own code: ONNX Runtime session options with the op library registered, and a
copy of the library for runtimes that load custom ops only from the model's folder (onnxruntime-genai).

    so = rbe_onnx.session_options(threads=2)
    session = onnxruntime.InferenceSession("gpt2-rbe/model.onnx", so, providers=["CPUExecutionProvider"])
"""
from __future__ import annotations

import filecmp
import os
import shutil
from pathlib import Path

from .library import get_library_path


def _check_threads(name: str, value: int | None) -> None:
    # bool is an int: reject it explicitly, `threads=True` is a mistake, not one thread.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None (ONNX Runtime's default), got {value!r}")


def session_options(threads: int | None = None, *, inter_op_threads: int | None = 1, options=None):
    """`onnxruntime.SessionOptions` that can run RBE models: the op library registered, thread counts set.

    threads: intra-op threads, the pool the RBE kernels split their columns over (None: ORT's default, one per
        physical core).
    inter_op_threads: threads running independent nodes side by side; they only matter under ORT_PARALLEL
        execution, and 1 keeps a default sequential session from keeping an idle pool (None: ORT's default).
    options: an existing SessionOptions to complete instead of a new one (profiling, optimisation level, ...).
    """
    import onnxruntime as ort

    _check_threads("threads", threads)
    _check_threads("inter_op_threads", inter_op_threads)
    so = ort.SessionOptions() if options is None else options
    if threads is not None:
        so.intra_op_num_threads = threads
    if inter_op_threads is not None:
        so.inter_op_num_threads = inter_op_threads
    so.register_custom_ops_library(get_library_path())
    return so


def bundle_library(folder: str | os.PathLike) -> Path:
    """Copy the installed op library into `folder` (replacing a different copy) and return the copy's path.

    onnxruntime-genai refuses a `custom_ops_library` outside the model folder or the working directory (and
    resolves symlinks before checking), so a model folder meant for it carries its own copy, named relatively
    in genai_config.json (see rbe_onnx/export/genai_config.py).
    """
    src = Path(get_library_path())
    dst = Path(folder) / src.name
    if not (dst.is_file() and filecmp.cmp(src, dst, shallow=False)):
        # Copy beside and rename over: a process that has the old copy mapped keeps a valid file.
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    return dst
