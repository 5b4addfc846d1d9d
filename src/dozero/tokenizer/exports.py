"""Writing a dozero tokenizer in other libraries' formats, so a model exported from dozero works there
as it does here: the same ids, the same end token, the same context length.

    export_tokenizer(tok, "out/", "hf", model_max_length=1024)
        tokenizer.json          the `tokenizers` pipeline (byte-level BPE, or one token per character)
        tokenizer_config.json   what AutoTokenizer needs beyond it: the class, <|endoftext|> as bos/eos,
                                the context length, and no "clean-up" that would change decoded text
        special_tokens_map.json the same special tokens, for older transformers versions
    export_tokenizer(tok, "out/", "gpt2")       vocab.json + merges.txt (OpenAI's encoder.json + vocab.bpe)
    export_tokenizer(tok, "out/", "tiktoken")   tokenizer.tiktoken + tiktoken_config.json, which
                                                `TIKTOKEN_SNIPPET` below turns into a tiktoken.Encoding

The ranks file alone lacks the pre-tokenization regex and the special tokens, and a tokenizer built
without them gives other ids; tiktoken_config.json holds both, and the snippet under "how_to_load".

A character tokenizer has no byte-level BPE to describe, but `tokenizers` can say "one token per
character" exactly: a BPE model with the characters as its vocabulary and no merges, no normalizer
and no pre-tokenizer (which would alter or cut the text), and a decoder that joins the tokens without
spaces (`Fuse`). `PreTrainedTokenizerFast` then gives dozero's ids on any text made of the vocabulary's
characters (a character outside it is dropped there; dozero refuses it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import atomic_write
from dozero.tokenizer.base import ENDOFTEXT, TOKENIZER_FILE, Tokenizer
from dozero.tokenizer.bpe import BPETokenizer
from dozero.tokenizer.char import CharTokenizer

FORMATS = ("tiktoken", "gpt2", "hf", "dozero")
TIKTOKEN_RANKS = "tokenizer.tiktoken"
TIKTOKEN_CONFIG = "tiktoken_config.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# How a tiktoken user loads the export (tests/test_exports.py runs exactly these lines).
TIKTOKEN_SNIPPET = """\
import json, tiktoken
from tiktoken.load import load_tiktoken_bpe
folder = "path/to/the/exported/folder"
spec = json.load(open(f"{folder}/tiktoken_config.json", encoding="utf-8"))
ranks = load_tiktoken_bpe(f"{folder}/tokenizer.tiktoken")
specials = spec["special_tokens"]
enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=specials)"""


def export_tokenizer(
    tok: Tokenizer, folder: str | os.PathLike, fmt: str = "hf", model_max_length: int | None = None
) -> list[Path]:
    """Write `tok` in another library's format (module docstring); returns the files written.
    `model_max_length`: the model's context length, recorded for transformers ("hf" only)."""
    folder = Path(folder)
    if fmt == "dozero":
        tok.save(folder)
        return [folder / TOKENIZER_FILE]
    if fmt not in FORMATS:
        raise DozeroError(f"unknown tokenizer format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "hf" and isinstance(tok, CharTokenizer | BPETokenizer):
        atomic_write(folder / "tokenizer.json", json.dumps(hf_tokenizer_json(tok), ensure_ascii=False, indent=1))
        return [folder / "tokenizer.json", *write_hf_tokenizer_config(tok, folder, model_max_length)]
    if not isinstance(tok, BPETokenizer):
        raise DozeroError(
            f"a {tok.kind} tokenizer cannot be written as {fmt!r} (byte-level BPE files); formats for it: hf, dozero"
        )
    from dozero.tokenizer.formats import printable_vocab_and_merges, tiktoken_text

    if fmt == "gpt2":
        vocab, merges = printable_vocab_and_merges(tok)
        atomic_write(folder / "vocab.json", json.dumps(vocab))
        atomic_write(folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return [folder / "vocab.json", folder / "merges.txt"]
    atomic_write(folder / TIKTOKEN_RANKS, tiktoken_text(tok.ranks))
    atomic_write(folder / TIKTOKEN_CONFIG, json.dumps(tiktoken_config(tok), ensure_ascii=False, indent=1) + "\n")
    return [folder / TIKTOKEN_RANKS, folder / TIKTOKEN_CONFIG]


def tiktoken_config(tok: BPETokenizer) -> dict:
    """What `tiktoken.Encoding` needs besides the ranks file, and the lines that load it."""
    return {
        "name": tok.name,
        "pat_str": tok.pattern,
        "special_tokens": dict(sorted(tok.special_tokens.items(), key=lambda item: item[1])),
        "mergeable_ranks": TIKTOKEN_RANKS,
        "n_vocab": tok.vocab_size,
        "how_to_load": TIKTOKEN_SNIPPET.splitlines(),
    }


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """The tokenizer.json that `PreTrainedTokenizerFast(tokenizer_file=...)` reads: GPT-2's byte-level
    layout for a BPE tokenizer; one token per character for a character tokenizer (module docstring)."""
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
    }
    if isinstance(tok, CharTokenizer):
        model.update(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[])
        pre_tokenizer = post_processor = None
        decoder = {"type": "Fuse"}  # join the characters as they are: no spaces between tokens
    else:
        from dozero.tokenizer.formats import printable_vocab_and_merges

        vocab, merges = printable_vocab_and_merges(tok)
        model.update(
            continuing_subword_prefix="", end_of_word_suffix="", vocab=vocab, merges=[[a, b] for a, b in merges]
        )
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        pre_tokenizer = post_processor = decoder = byte_level
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for s, i in sorted(tok.special_tokens.items(), key=lambda item: item[1])
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    }


def write_hf_tokenizer_config(tok: Tokenizer, folder: Path, model_max_length: int | None = None) -> list[Path]:
    """tokenizer_config.json + special_tokens_map.json: without them AutoTokenizer has no end token
    (so no `eos_token_id` for generate's stopping) and no maximum length (it warns on nothing)."""
    specials = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT} if tok.eot_id is not None else {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # transformers' default "clean-up" rewrites " ." as "." when decoding: dozero's text would differ
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    atomic_write(folder / "tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=1) + "\n")
    atomic_write(folder / "special_tokens_map.json", json.dumps(specials, ensure_ascii=False, indent=1) + "\n")
    return [folder / "tokenizer_config.json", folder / "special_tokens_map.json"]
