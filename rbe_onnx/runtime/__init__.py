"""Running exported models in ONNX Runtime: sessions with the op library, feeds, KV-cached generation."""
from .feeds import Gpt2Shape, prefill_feeds
from .session import make_session
from .greedy import greedy_generate
from .sampling import SamplingConfig
from .generator import Completion, Generation, Generator

__all__ = ["Gpt2Shape", "prefill_feeds", "make_session", "greedy_generate", "SamplingConfig", "Generator",
           "Generation", "Completion"]
