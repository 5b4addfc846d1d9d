"""Tokenizers: byte-level BPE (GPT-2's vocabulary or your own, trained here) and nanoGPT's character level.

    from dozero.tokenizer import load_tokenizer, CharTokenizer, train_bpe
    tok = load_tokenizer("gpt2")                       # or a model folder
    tok = CharTokenizer.from_text(text)                # the tiny-Shakespeare demo's 65 characters
    tok = train_bpe(["corpus/"], vocab_size=8192)      # your own byte-level BPE

Command line: `dozero tokenizer train|encode|decode|stats|export --help`.
GPT-2's vocabulary ships as dozero/assets/gpt2.tiktoken (from openai-whisper 20250625, MIT; see formats.py).
"""

from dozero.tokenizer.base import ENDOFTEXT, SPECIAL_MODES, Tokenizer
from dozero.tokenizer.bpe import GPT2_PATTERN, BPETokenizer
from dozero.tokenizer.char import CharTokenizer
from dozero.tokenizer.formats import export_tokenizer, gpt2, has_tokenizer, load_tokenizer

__all__ = [
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "SPECIAL_MODES",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "export_tokenizer",
    "gpt2",
    "has_tokenizer",
    "load_tokenizer",
]
