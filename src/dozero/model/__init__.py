"""The GPT-2 model (`gpt.py`), its Hugging Face import/export and dozero's own checkpoint format.

`GPTModel` and `KVCache` are imported on first use, so `import dozero.model.commands` (and with it
`dozero --help`) does not pay for importing torch.
"""

__all__ = ["GPTModel", "KVCache"]


def __getattr__(name: str):
    if name in __all__:
        from dozero.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module 'dozero.model' has no attribute {name!r}")
