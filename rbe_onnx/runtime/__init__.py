"""Running exported models in ONNX Runtime: sessions with the op library, feeds, a KV-cached greedy loop."""
from .feeds import Gpt2Shape, prefill_feeds
from .session import make_session
from .greedy import greedy_generate

__all__ = ["Gpt2Shape", "prefill_feeds", "make_session", "greedy_generate"]
