"""Readable explanations of the errors ONNX Runtime raises on rewritten models.

The commonest one: a session created without the RBE op library registered fails with ORT's own
"ai.rbe:RBEFusedGemm(-1) is not a registered function/op", which does not say what to do about it.
"""
from __future__ import annotations

REGISTER_HINT = ("register the RBE op library: "
                 "so.register_custom_ops_library(rbe_onnx.get_library_path())")

# How ORT versions word "no kernel / schema for this op or domain".
_UNREGISTERED = (
    "is not a registered function/op",        # model load, schema unknown (ORT 1.1x - 1.2x+)
    "not a registered",
    "could not find an implementation",       # domain known, no kernel for the node
    "no opset import for domain",
    "unrecognized domain",
    "unregistered",
)
_RBE = ("ai.rbe", "rbefusedgemm")


def explain_ort_error(exc: BaseException | str) -> str:
    """The message of an ORT exception (or a message string), with a hint appended when the error is the
    RBE op (domain ai.rbe, op RBEFusedGemm) not being registered in the session options."""
    msg = str(exc)
    low = msg.lower()
    if any(m in low for m in _RBE) and any(m in low for m in _UNREGISTERED):
        return f"{msg}\nhint: {REGISTER_HINT}"
    return msg


__all__ = ["explain_ort_error", "REGISTER_HINT"]
