"""The GPT-2 model (`gpt.py`), its Hugging Face import/export and dozero's own checkpoint format."""

from dozero.model.gpt import GPTModel, KVCache

__all__ = ["GPTModel", "KVCache"]
