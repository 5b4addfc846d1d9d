"""The house rules of STYLE.md that a machine can check: import direction and the CLI's verbs."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dozero"

# Pipeline order: a module may import dozero modules of its own rank or lower, never higher.
# generate uses model + tokenizer; train may print samples through generate; nothing imports cli.
RANK = {
    "errors": 0,
    "cli_args": 0,
    "files": 0,
    "config": 1,
    "runtime": 1,
    "tokenizer": 2,
    "data": 3,
    "model": 4,
    "generate": 5,
    "train": 6,
    "parallel": 6,  # strategies applied to a finished model (FSDP, activation checkpointing); used by train
    "serve": 6,
    "course": 7,
    "finetune": 7,  # after train: chat templates, SFT, LoRA; uses train's loop
    "align": 7,  # after finetune: DPO, RL; uses finetune's templates, LoRA and train's loop
    "evaluate": 7,  # uses model, tokenizer, data and generate; never train
    "compress": 7,  # uses model, tokenizer, generate; distill reuses train's machinery
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def _stage(module: str) -> str:
    """'dozero.model.hf' -> 'model'; 'dozero' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _dozero_imports(path: Path) -> list[tuple[str, ast.AST]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name.split(".")[0] == "dozero"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "dozero":
                if node.module == "dozero":  # `from dozero import tokenizer` or `__version__`
                    for alias in node.names:
                        is_module = (SRC / f"{alias.name}.py").exists() or (SRC / alias.name).is_dir()
                        found.append((f"dozero.{alias.name}" if is_module else "dozero", node))
                else:
                    found.append((node.module, node))
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts)


SOURCES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_one_way(path):
    own = _stage(_module_name(path))
    assert own in RANK, f"new top-level module {own}: give it a rank in this test"
    for imported, node in _dozero_imports(path):
        other = _stage(imported)
        if other == "__init__":
            continue  # the package's own __init__ holds only the version
        assert RANK.get(other, 99) <= RANK[own], (
            f"{path.relative_to(SRC)}:{node.lineno} imports {imported}: "
            f"stage '{own}' must not depend on the later stage '{other}'"
        )


def test_distributed_and_rank_env_live_in_runtime_only():
    for path in SOURCES:
        if path.name == "runtime.py" and path.parent == SRC:
            continue
        text = path.read_text()
        if path.parent != SRC / "parallel":  # where a strategy is applied to a model (STYLE.md)
            assert "torch.distributed" not in text, f"{path} touches torch.distributed; use dozero.runtime or parallel"
        for var in ('"RANK"', '"WORLD_SIZE"', '"LOCAL_RANK"'):
            assert var not in text, f"{path} reads {var}; ask dozero.runtime"


def test_cli_lists_exactly_the_pipeline_verbs(capsys):
    """Freeze the verbs (torchtitan freezes its CLI the same way): a new verb is a design decision."""
    from dozero.cli import build_parser, main

    parser = build_parser()
    (verbs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(verbs.choices) == [
        "model",
        "tokenizer",
        "data",
        "train",
        "finetune",
        "chat",
        "align",
        "generate",
        "eval",
        "compress",
        "serve",
        "attention",
        "doctor",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for verb in verbs.choices:
        assert f"    {verb}" in out, f"`dozero --help` does not list {verb}"
