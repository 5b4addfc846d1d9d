"""`dozero data prepare|inspect`: the command-line face of the data stage (wiring only; the work is in prepare.py).

dozero data prepare corpus/ --out data/mycorpus [--tokenizer gpt2|char|DIR] [--no-near-dedup ...]
dozero data inspect data/mycorpus [--split val] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dozero.cli_args import add_dataclass_args, apply_args

PREPARE_EPILOG = """\
examples:
  dozero data prepare tinyshakespeare --separator '\\n\\n' --out data/shakespeare    GPT-2's BPE, a document a paragraph
  dozero data prepare 'dumps/*.jsonl.zst' --field content --out data/web --val-tokens 1000000
  dozero data prepare tinyshakespeare --out data/shakespeare_char \\
      --tokenizer char --separator '\\n\\n' --no-clean       (nanoGPT's shakespeare_char)

'tinyshakespeare' is the text shipped with dozero (1 MB); a file or folder of that name here wins.
The folder gets train_*.bin / val_*.bin shards, manifest.json, the tokenizer and clean_report.json/.txt.
It is built beside DIR and swapped in when complete: a failed run leaves DIR as it was. DIR must be new,
empty or a data folder; --force writes into another folder (its own files stay, dozero's are replaced).
Training reads it with `dozero train --data DIR`."""


def register(subparsers) -> None:
    from dozero.data.clean import CleanConfig
    from dozero.data.prepare import PrepareConfig

    p = subparsers.add_parser(
        "data", help="raw text -> cleaned documents -> token shards", description="Prepare and inspect datasets."
    )
    p.set_defaults(verb_parser=p)
    sub = p.add_subparsers(metavar="ACTION")

    prep = sub.add_parser(
        "prepare",
        help="clean and tokenize files into shards",
        description="Read .txt/.md/.py/.jsonl/.parquet files (optionally .gz/.zst), clean them (normalize, filter, "
        "scrub personal data, deduplicate) and tokenize them into binary shards with a manifest.",
        epilog=PREPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders (searched recursively) or globs")
    prep.add_argument("--out", required=True, metavar="DIR", help="output folder (a data folder in it is replaced)")
    prep.add_argument("--force", action="store_true", help="write into DIR even if it is not a data folder")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_args(prep, PrepareConfig, group_title="preparation")
    # The flag's name before it matched `dozero train --val-fraction`; old scripts keep working.
    prep.add_argument("--val-ratio", dest="val_fraction", type=float, help=argparse.SUPPRESS)
    add_dataclass_args(prep, CleanConfig, group_title="cleaning (each step can be switched off)")
    prep.set_defaults(func=run_prepare)

    insp = sub.add_parser("inspect", help="manifest, token counts, a decoded sample, the cleaning report")
    insp.add_argument("data_dir", metavar="DIR")
    insp.add_argument("--split", default="train", help="split to sample from (default: train)")
    insp.add_argument("--tokens", type=int, default=64, help="length of the decoded sample window (default: 64)")
    insp.add_argument("--seed", type=int, default=0, help="where the sample window starts (default: 0)")
    insp.add_argument("--no-verify", action="store_true", help="skip the shard checksums (faster on big folders)")
    insp.set_defaults(func=run_inspect)


def run_prepare(args) -> int:
    from dozero.data.clean import CleanConfig
    from dozero.data.prepare import PrepareConfig, prepare

    cfg, clean_cfg = apply_args(PrepareConfig(), args), apply_args(CleanConfig(), args)
    manifest = prepare(args.inputs, args.out, cfg, clean_cfg, progress=not args.quiet, force=args.force)
    print(_describe(manifest))
    print((Path(args.out) / "clean_report.txt").read_text(encoding="utf-8"), end="")
    for warning in manifest["warnings"]:
        print(f"warning: {warning}")
    details = _input_details(Path(args.out) / "clean_report.json")
    if details:  # skipped lines are said here, not only in the report: a broken export should not go unseen
        print(_input_line(details))
        for example in details.get("malformed_json_examples", [])[:3]:
            print(f"  bad JSON line {example}")
    return 0


def _describe(manifest: dict) -> str:
    tok = manifest["tokenizer"]
    lines = [
        f"tokenizer: {tok['name']} ({tok['kind']}, vocab {tok['vocab_size']:,}, fingerprint {tok['fingerprint']}), "
        f"ids stored as {manifest['dtype']}",
        f"documents: {manifest['document_separator']}",
    ]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:>5}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    return "\n".join(lines)


def run_inspect(args) -> int:
    import numpy as np

    from dozero.data.shards import load_data_tokenizer, load_split, read_manifest

    manifest = read_manifest(args.data_dir)
    print(_describe(manifest))
    tokenizer = load_data_tokenizer(args.data_dir)
    tokens = load_split(args.data_dir, args.split, tokenizer=tokenizer, verify=not args.no_verify)
    print(f"checksums: {'skipped' if args.no_verify else 'all shards verified'}")
    n = min(args.tokens, len(tokens))
    if n:
        start = int(np.random.default_rng(args.seed).integers(0, len(tokens) - n + 1)) if args.seed else 0
        ids = tokens[start : start + n].tolist()
        print(f"\nsample of {args.split} (tokens {start:,}..{start + n:,}):\n{ids}\n---\n{tokenizer.decode(ids)}\n---")
    report = Path(args.data_dir) / "clean_report.txt"
    if report.is_file():
        print("\ncleaning report:\n" + report.read_text(encoding="utf-8"), end="")
    else:
        print(f"\ncleaning report: none ({report.name} is missing; the shards do not need it)")
    for warning in manifest.get("warnings", []):
        print(f"warning: {warning}")
    details = _input_details(Path(args.data_dir) / "clean_report.json")
    if details:
        print(_input_line(details))
    return 0


def _input_line(details: dict) -> str:
    return (
        f"input: {details['undecodable_bytes_replaced']:,} undecodable bytes replaced by U+FFFD, "
        f"{details['empty_files']:,} empty files skipped, {details['malformed_json_lines']:,} bad JSON lines skipped"
    )


def _input_details(path: Path) -> dict | None:
    """The input counts of clean_report.json, or None if it is missing or not what prepare writes."""
    try:
        details = json.loads(path.read_text(encoding="utf-8"))["input"]
        keys = ("undecodable_bytes_replaced", "empty_files", "malformed_json_lines")
        if all(isinstance(details[k], int) for k in keys) and any(details[k] for k in keys):
            return details
    except (OSError, ValueError, KeyError, TypeError):
        pass  # the report is informative only: a missing or damaged one must not stop `inspect`
    return None
