"""Export HF GPT-2 / BERT checkpoints to ONNX graphs that the compression passes understand."""
from .bert import export_bert
from .gpt2 import export_gpt2
from .random_models import make_random_bert, make_random_gpt2, minilm_dir

__all__ = ["export_bert", "export_gpt2", "make_random_bert", "make_random_gpt2", "minilm_dir"]
