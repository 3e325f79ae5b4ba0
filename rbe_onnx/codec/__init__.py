"""RBE codec: encode a weight into seeds + packed codes and decode it back (docs/FORMAT.md)."""
from .baseline import matmulnbits_rtn
from .decode import decode
from .encode import encode
from .rice import RiceTable, rice_decode, rice_encode
from .seed import FormatError
from .weight import RBEWeight

__all__ = ["encode", "decode", "RBEWeight", "RiceTable", "rice_encode", "rice_decode", "FormatError", "matmulnbits_rtn"]
