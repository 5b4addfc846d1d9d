"""`dozero tokenizer ...`: train a byte-level BPE, encode and decode text, and compare tokenizers.

Actions: train, encode, decode, stats, export; examples in `VERB_EPILOG` below (`dozero tokenizer --help`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dozero.errors import DozeroError
from dozero.files import input_path
from dozero.tokenizer.base import TOKENIZER_FOLDER_FILES

VERB_EPILOG = """\
examples:
  dozero tokenizer train tinyshakespeare --vocab-size 1024 --out tok/
  echo "Hello world" | dozero tokenizer encode                    15496 995 198
  echo "15496 995" | dozero tokenizer decode                      Hello world
  dozero tokenizer stats --tokenizer tok/ tinyshakespeare
  dozero tokenizer export tok/ out/ --format hf                   tokenizer.json for transformers
--tokenizer takes 'gpt2' (GPT-2's vocabulary, shipped with dozero) or a model folder / tokenizer file."""

TRAIN_EPILOG = """\
examples:
  dozero tokenizer train tinyshakespeare --vocab-size 1024 --out tok/
  dozero tokenizer train 'corpus/**/*.txt' --vocab-size 32768 --special '<|endoftext|>' --special '<|pad|>' \\
      --out tok/ --export hf          also writes tokenizer.json for transformers
INPUT: files, folders (every file below) or quoted glob patterns; 'tinyshakespeare' is the text shipped
with dozero (1 MB, char-rnn's). Ids: 0-255 the bytes, then the merges in the order learned, then the
special tokens. Ties between equally frequent pairs go to the pair whose bytes sort first, so the same
corpus always gives the same vocabulary. Invalid UTF-8 bytes are kept (one token each)."""

ENCODE_EPILOG = """\
examples:
  echo "Hello world" | dozero tokenizer encode                    15496 995 198  (GPT-2's ids)
  dozero tokenizer encode --tokenizer runs/shakespeare/best play.txt --json > ids.json
Special-token text in the input ("<|endoftext|>") is an error unless --special text (encode it as ordinary
text) or --special allow (encode it as the special token's id)."""

DECODE_EPILOG = """\
examples:
  echo "15496 995" | dozero tokenizer decode                      Hello world
  dozero tokenizer decode ids.json --tokenizer tok/ > text.txt
Ids may be space/line separated or a JSON list. The exact bytes are written (no U+FFFD) unless --text-only."""

STATS_EPILOG = """\
examples:
  dozero tokenizer stats                                          GPT-2's vocabulary: size, longest tokens
  dozero tokenizer stats --tokenizer tok/ tinyshakespeare          bytes per token on a corpus
  dozero tokenizer stats --text "Olá, coração!"                  how a text is cut into tokens
Bytes per token is the usual way to compare tokenizers on the same text: higher = shorter sequences."""

EXPORT_EPILOG = """\
examples:
  dozero tokenizer export tok/ out/ --format hf        out/tokenizer.json: PreTrainedTokenizerFast(tokenizer_file=...)
  dozero tokenizer export gpt2 out/ --format gpt2      out/vocab.json + merges.txt (= OpenAI's encoder.json, vocab.bpe)
  dozero tokenizer export tok/ out/ --format tiktoken  out/tokenizer.tiktoken + tiktoken_config.json (pattern, specials)
  dozero tokenizer export runs/shakespeare/best out/           a character tokenizer: one token per character"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE; encode, decode, compare tokenizers",
        description="Byte-level BPE tokenizers (GPT-2's vocabulary or your own) and nanoGPT's character level.",
        epilog=VERB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(verb_parser=p)
    sub = p.add_subparsers(metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    train = sub.add_parser("train", help="train a BPE vocabulary on a corpus", epilog=TRAIN_EPILOG, formatter_class=fmt)
    train.add_argument("inputs", nargs="+", metavar="INPUT", help="text files, folders or glob patterns")
    train.add_argument("--vocab-size", type=int, required=True, help="ids in all: 256 bytes + merges + specials")
    train.add_argument(
        "--special",
        action="append",
        metavar="TOKEN",
        help="a special token (repeatable; default: <|endoftext|>; --special '' for none)",
    )
    train.add_argument("--out", required=True, metavar="DIR", help="folder to write the tokenizer into")
    train.add_argument("--force", action="store_true", help="write into DIR even if it holds other files (a model)")
    train.add_argument("--export", choices=["hf", "gpt2", "tiktoken"], action="append", help="also write this format")
    train.add_argument("--workers", type=int, default=None, help="processes for pre-tokenizing (default: all cores)")
    train.set_defaults(func=run_train)

    def tokenizer_arg(q):
        q.add_argument(
            "--tokenizer", default="gpt2", metavar="SPEC", help="'gpt2' (default), a model folder or tokenizer file"
        )

    enc = sub.add_parser("encode", help="text -> token ids", epilog=ENCODE_EPILOG, formatter_class=fmt)
    enc.add_argument("file", nargs="?", metavar="FILE", help="text to encode (default: standard input)")
    tokenizer_arg(enc)
    enc.add_argument("--special", choices=["raise", "text", "allow"], default="raise", help="special-token text")
    enc.add_argument("--json", action="store_true", help="print a JSON list instead of space-separated ids")
    enc.set_defaults(func=run_encode)

    dec = sub.add_parser("decode", help="token ids -> text", epilog=DECODE_EPILOG, formatter_class=fmt)
    dec.add_argument("file", nargs="?", metavar="FILE", help="ids to decode (default: standard input)")
    tokenizer_arg(dec)
    dec.add_argument("--text-only", action="store_true", help="replace invalid UTF-8 by U+FFFD")
    dec.set_defaults(func=run_decode)

    stats = sub.add_parser("stats", help="vocabulary size, bytes per token, longest tokens", epilog=STATS_EPILOG,
                           formatter_class=fmt)  # fmt: skip
    stats.add_argument("files", nargs="*", metavar="FILE", help="corpus files to measure bytes per token on")
    tokenizer_arg(stats)
    stats.add_argument("--text", help="show how this text is cut into tokens")
    stats.add_argument("--top", type=int, default=10, help="how many longest tokens to list (default: 10)")
    stats.set_defaults(func=run_stats)

    export = sub.add_parser("export", help="write a tokenizer in Hugging Face's, GPT-2's or tiktoken's format",
                            epilog=EXPORT_EPILOG, formatter_class=fmt)  # fmt: skip
    export.add_argument("tokenizer", metavar="SPEC", help="'gpt2', a model folder or a tokenizer file")
    export.add_argument("out", metavar="DIR", help="folder to write into")
    export.add_argument("--format", choices=["hf", "gpt2", "tiktoken", "dozero"], default="hf", help="default: hf")
    export.add_argument(
        "--force", action="store_true", help="write into a folder holding more than tokenizer files (a model's)"
    )
    export.set_defaults(func=run_export)


def _read_input(file: str | None) -> bytes:
    if file is None:
        return sys.stdin.buffer.read()
    try:
        return Path(input_path(file)).read_bytes()  # "tinyshakespeare": the text shipped with dozero
    except OSError as e:
        raise DozeroError(f"cannot read {file}: {e.strerror}") from None


def _encode(tok, data: bytes, special: str) -> list[int]:
    if tok.kind == "bpe":
        return tok.encode_bytes(data, special=special)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DozeroError(f"input is not valid UTF-8 at byte {e.start}; a character tokenizer needs text") from None
    return tok.encode(text, special=special)


def is_tokenizer_folder(path: Path) -> bool:
    """Holds tokenizer files only (hidden files aside): replacing them loses nothing else."""
    return all(p.name in TOKENIZER_FOLDER_FILES or p.name.startswith(".") for p in path.iterdir())


def run_train(args) -> None:
    from dozero.files import check_output_folder, removed_if_failed
    from dozero.tokenizer.formats import export_tokenizer
    from dozero.tokenizer.train import train_bpe

    # Before training (minutes), not after: a model folder's tokenizer is not replaced without --force.
    check_output_folder(args.out, "tokenizer folder", is_tokenizer_folder, args.force)
    specials = [s for s in (args.special if args.special is not None else ["<|endoftext|>"]) if s]
    tok, report = train_bpe(args.inputs, args.vocab_size, specials, name=Path(args.out).name, workers=args.workers)
    with removed_if_failed(args.out):  # a full disk leaves no half-written --out
        tok.save(args.out)
        for fmt in args.export or []:
            export_tokenizer(tok, args.out, fmt)
    print(f"read {report.files} file(s), {report.bytes / 1e6:.2f} MB: {report.chunks:,} chunks, "
          f"{report.distinct_chunks:,} distinct; {report.merges:,} merges in {report.seconds:.1f} s")  # fmt: skip
    if report.invalid_bytes:
        print(f"{report.invalid_bytes:,} invalid UTF-8 byte(s) in {len(report.invalid_files)} file(s), kept as "
              f"single-byte tokens (first: {report.invalid_files[0]})")  # fmt: skip
    if tok.vocab_size < args.vocab_size:
        print(f"note: the corpus ran out of pairs; the vocabulary has {tok.vocab_size} ids, not {args.vocab_size}")
    print(f"wrote {args.out} (vocab_size {tok.vocab_size}, fingerprint {tok.fingerprint()})")


def run_encode(args) -> None:
    from dozero.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = _encode(tok, _read_input(args.file), args.special)
    print(json.dumps(ids) if args.json else " ".join(map(str, ids)))


def run_decode(args) -> None:
    from dozero.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    raw = _read_input(args.file).decode("utf-8", errors="replace").strip()
    try:
        ids = json.loads(raw) if raw.startswith("[") else [int(x) for x in raw.split()]
    except ValueError:
        raise DozeroError("decode reads token ids: integers separated by spaces, or a JSON list") from None
    if args.text_only:
        sys.stdout.write(tok.decode(ids))
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(tok.decode_bytes(ids))
    sys.stdout.flush()


def run_stats(args) -> None:
    from dozero.tokenizer.formats import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    print(f"tokenizer    {args.tokenizer} ({tok.kind}), vocab_size {tok.vocab_size}, fingerprint {tok.fingerprint()}")
    print(f"special      {', '.join(f'{s}={i}' for s, i in tok.special_tokens.items()) or 'none'}")
    if tok.kind == "bpe" and args.top > 0:
        longest = sorted(tok.ranks, key=lambda t: (-len(t), tok.ranks[t]))[: args.top]
        print(f"longest      {', '.join(repr(t.decode('utf-8', 'replace')) for t in longest)}")
    total_bytes = total_tokens = 0
    for file in args.files:
        data = _read_input(file)
        n = len(_encode(tok, data, "text"))
        total_bytes, total_tokens = total_bytes + len(data), total_tokens + n
        print(f"{file}: {len(data):,} bytes -> {n:,} tokens, {len(data) / max(n, 1):.2f} bytes/token")
    if len(args.files) > 1:
        rate = total_bytes / max(total_tokens, 1)
        print(f"all: {total_bytes:,} bytes -> {total_tokens:,} tokens, {rate:.2f} bytes/token")
    if args.text is not None:
        ids = tok.encode(args.text, special="allow")
        pieces = [tok.decode([i]) for i in ids]
        print(f"text         {len(args.text)} characters, {len(args.text.encode())} bytes -> {len(ids)} tokens")
        print("tokens       " + " ".join(f"{p!r}:{i}" for p, i in zip(pieces, ids, strict=True)))


def run_export(args) -> None:
    from dozero.files import check_output_folder, removed_if_failed
    from dozero.tokenizer.formats import export_tokenizer, load_tokenizer

    # A model's or a dataset's tokenizer is not replaced without --force: its ids are what the weights or
    # the shards were made with, and a tokenizer of another vocabulary would break them for good.
    check_output_folder(args.out, "tokenizer folder", is_tokenizer_folder, args.force)
    tok = load_tokenizer(args.tokenizer)
    with removed_if_failed(args.out):
        for path in export_tokenizer(tok, args.out, args.format):
            print(f"wrote {path}")
