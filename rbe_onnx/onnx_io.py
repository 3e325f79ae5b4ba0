"""Loading and saving ONNX models the way ONNX Runtime can memory-map them.

onnx's own external-data writer packs tensors back to back; ORT maps a tensor's bytes in place only when its
offset is aligned to the allocation granularity, so large tensors here start on 64 KiB boundaries. Small ones
(biases, LayerNorms, the codes of small layers) are copied at load anyway, and padding each of them to 64 KiB
would cost megabytes in a model that is meant to be small: they are packed on cache-line boundaries.
"""
from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import numpy_helper

MAX_IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 writes 14 unless told otherwise
ALIGNMENT = 1 << 16
MAP_LIMIT = 1 << 20  # tensors from this size on are aligned for mapping
SMALL_ALIGNMENT = 64
INLINE_LIMIT = 1024  # tensors smaller than this stay inside model.onnx


class ModelLoadError(ValueError):
    """A file that is missing, truncated or not an ONNX model."""


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as e:  # protobuf's DecodeError and friends: name the file, not the parser internals
        raise ModelLoadError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not an ONNX model (the graph has no nodes)")
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool = True) -> Path:
    """Writes model.onnx and, with external_data, its tensors to `<name>.data` (those of MAP_LIMIT bytes and more
    64 KiB aligned).

    The model must hold its tensor data (loaded with external data); afterwards its tensors point at the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if data_path.exists():
        data_path.unlink()
    if external_data:
        with open(data_path, "wb") as f:
            for tensor in model.graph.initializer:
                raw = numpy_helper.to_array(tensor).tobytes()
                if len(raw) < INLINE_LIMIT:
                    continue
                offset = -f.tell() % (ALIGNMENT if len(raw) >= MAP_LIMIT else SMALL_ALIGNMENT)
                f.write(b"\0" * offset)
                start = f.tell()
                f.write(raw)
                _point_to_external(tensor, data_name, start, len(raw))
    onnx.save_model(model, str(path))
    return path


def _point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                  "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
