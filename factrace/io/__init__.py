"""Checkpoints in: the config parser and the architecture table, safetensors and GGUF readers, tokenizers,
packaged models, and :func:`load`. See docs/ARCHITECTURE.md."""
from .load import load

__all__ = ["load"]
