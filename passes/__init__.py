"""Graph rewrites: MatMul/Gemm with constant weights -> RBEFusedGemm (pattern -> replacement rules)."""
from .fused_gemm import RBE_DOMAIN, Candidate, find_candidates, replace_candidates, set_accuracy_level

__all__ = ["RBE_DOMAIN", "Candidate", "find_candidates", "replace_candidates", "set_accuracy_level"]
