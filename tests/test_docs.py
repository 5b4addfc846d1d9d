"""The docs never rot: every `dozero` command in the READMEs and docs/ runs, and every link to the code is right.

What counts as a command: a line starting with `dozero ` or `$ dozero ` inside a ```bash or
```console block (a trailing backslash continues it; a comment after two spaces, `  # ...`, is
dropped). Blocks marked ```text are shown, never run: the docs use them for what needs a GPU,
hours, or files from the internet.

The guide's commands run in page order (English pages, then the Portuguese ones; a command already
run is not repeated) in one temporary folder, so a later page may use what an earlier one made,
just as a reader following the guide would; the two READMEs' commands run the same way in a folder
of their own. Those folders are empty and have no `../shared` beside them: the docs must work on a
fresh clone, where the text they use is the tiny Shakespeare shipped with dozero, by its name
`tinyshakespeare`. Two substitutions keep the suite fast (see `cheap`): `dozero doctor` gets
`--skip-compile` (trying torch.compile takes ~20 s on a CPU), and `dozero train` runs 6 steps
instead of the docs' hundreds or thousands (and skips its closing sample text).

Links such as [`explicit_attention`](../../src/dozero/model/gpt.py#L126) must name an existing file,
and the named line must contain the name in backticks. When code moves, fix the anchors with

    .venv/bin/python tests/test_docs.py --fix
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LANGUAGES = ("en", "pt-BR")
PAGES = [
    "README.md",
    "1-attention.md",
    "2-preparing-the-ground.md",
    "3-data-and-tokenization.md",
    "4-architecture.md",
    "5-training.md",
    "6-generating-text.md",
    "7-from-gpt2-to-llama.md",
    # The stages after pretraining. Their bash blocks are cheap (scaling: one `dozero model info`;
    # the others have none): what needs SmolLM2-135M for minutes, a server or torchrun stays in
    # ```text blocks. A page whose commands would take more than ~20 s belongs outside this list
    # (its links are still checked: see `guide_files`).
    "fine-tuning.md",
    "evaluation.md",
    "compression.md",
    "alignment.md",
    "serving.md",
    "scaling.md",
]
READMES = [REPO / "README.md", REPO / "README.pt-BR.md"]
FENCE = re.compile(r"^```(\w[\w-]*)?\s*$")
COMMENT = re.compile(r"\s{2,}#\s.*$")  # "dozero doctor      # what this computer can do"
LINK = re.compile(r"\[`([^`]+)`\]\(((?:\.\./)+[^)#\s]+)(?:#L(\d+))?\)")
SHELL_CHARS = re.compile(r"[|<>;&]")


def commands(path: Path) -> list[str]:
    """The `dozero ...` lines of the page's bash/console blocks, continuations joined."""
    found, lang, pending = [], None, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            lang = None if lang is not None else (fence.group(1) or "")
            continue
        if lang not in ("bash", "console", "sh", "shell"):
            continue
        text = COMMENT.sub("", line.strip())
        if pending:
            text = pending + " " + text
        elif text.startswith("$ "):
            text = text[2:]
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        if text.startswith("dozero "):
            found.append(text)
    return found


CODE_SPAN = re.compile(r"`([^`\n]+)`")
COMMAND_WORDS = ("dozero ", "python ", "python3 ", "torchrun ", "make ", ".venv/bin/", "$ ")


def runnable_text(path: Path) -> list[str]:
    """What a reader copies and runs: every line of the page's code blocks except ```text ones, and
    the inline `code` spans that are commands."""
    found, lang = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        fence = FENCE.match(line.strip())
        if fence:
            lang = None if lang is not None else (fence.group(1) or "")
        elif lang is None:
            found += [span for span in CODE_SPAN.findall(line) if span.startswith(COMMAND_WORDS)]
        elif lang != "text":
            found.append(line)
    return found


def links(path: Path) -> list[tuple[str, Path, int | None]]:
    """(name, target file, line or None) of each [`name`](relative/path#Lnn) link to the repository."""
    text = path.read_text(encoding="utf-8")
    return [
        (m.group(1), (path.parent / m.group(2)).resolve(), m.group(3) and int(m.group(3))) for m in LINK.finditer(text)
    ]


def symbol(name: str) -> str:
    """`GPTModel.forward()` -> 'forward'; `--max-steps` -> 'max_steps'; `gpt.py` -> 'gpt.py'."""
    name = name.strip().rstrip("()").split("(")[0]
    if name.startswith("--"):
        name = name[2:].replace("-", "_")
    return name.split(".")[-1] if not name.endswith(".py") else name


def find_definition(lines: list[str], name: str, near: int) -> int | None:
    """1-based line defining `name` (def/class/assignment/field), nearest to `near`; else any mention."""
    key = symbol(name)
    word = re.escape(key)
    patterns = [
        rf"^\s*(async\s+)?(def|class)\s+{word}\b",
        rf"^\s*(self\.)?{word}\s*(:[^=]*)?=",
        rf"^\s*{word}\s*:",
        rf"\b{word}\b",
    ]
    for pattern in patterns:
        hits = [i + 1 for i, line in enumerate(lines) if re.search(pattern, line)]
        if hits:
            return min(hits, key=lambda i: abs(i - near))
    return None


def check_link(name: str, target: Path, line: int | None) -> str | None:
    """None if the link is right, else what is wrong with it."""
    if not target.exists():
        return f"links to {target.relative_to(REPO) if REPO in target.parents else target}, which does not exist"
    if line is None or target.is_dir():
        return None
    lines = target.read_text(encoding="utf-8").splitlines()
    if not 1 <= line <= len(lines):
        return f"#L{line} is past the end of {target.name} ({len(lines)} lines)"
    if not re.search(rf"\b{re.escape(symbol(name))}\b", lines[line - 1]):
        expected = find_definition(lines, name, line)
        return f"{target.name}#L{line} does not mention `{symbol(name)}` (line {expected} does)"
    return None


def all_pages() -> list[Path]:
    """The pages whose commands run, English first, in reading order."""
    return [DOCS / lang / page for lang in LANGUAGES for page in PAGES]


def guide_files() -> list[Path]:
    """Every page in docs/en and docs/pt-BR, listed in PAGES or not: their links are all checked."""
    return sorted(path for lang in LANGUAGES for path in (DOCS / lang).glob("*.md"))


# ---- the tests ---------------------------------------------------------------------------------


def test_every_page_exists_in_both_languages_and_the_readmes_link_them():
    for path in all_pages():
        assert path.exists(), f"missing page {path.relative_to(REPO)}"
    for readme, lang in (("README.md", "en"), ("README.pt-BR.md", "pt-BR")):
        text = (REPO / readme).read_text(encoding="utf-8")
        assert f"docs/{lang}/" in text, f"{readme} does not link the {lang} guide"
    names = [{path.name for path in (DOCS / lang).glob("*.md")} for lang in LANGUAGES]
    assert names[0] == names[1], f"pages in one language only: {sorted(names[0] ^ names[1])}"
    for page in sorted(names[0] - {"README.md"}):
        for lang in LANGUAGES:
            index = (DOCS / lang / "README.md").read_text(encoding="utf-8")
            assert f"]({page})" in index, f"{lang} index misses {page}"


ANY_LINK = re.compile(r"\]\((?!https?:|#)([^)#\s]+)")


@pytest.mark.parametrize("path", [*guide_files(), *READMES], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_relative_link_and_image_exists(path):
    if not path.exists():
        pytest.skip("page missing (reported by another test)")
    missing = [m for m in ANY_LINK.findall(path.read_text(encoding="utf-8")) if not (path.parent / m).exists()]
    assert not missing, f"{path.relative_to(REPO)} links to missing files: {missing}"


def test_both_languages_use_the_same_verbs_on_each_page():
    for page in PAGES:
        verbs = [{" ".join(c.split()[:2]) for c in commands(DOCS / lang / page)} for lang in LANGUAGES]
        assert verbs[0] == verbs[1], f"{page}: en runs {sorted(verbs[0])}, pt-BR runs {sorted(verbs[1])}"


@pytest.mark.parametrize("path", guide_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_links_to_code_are_right(path):
    if not path.exists():
        pytest.skip("page missing (reported by another test)")
    problems = [
        f"[`{name}`]: {problem}" for name, target, line in links(path) if (problem := check_link(name, target, line))
    ]
    assert not problems, (
        f"{path.relative_to(REPO)}:\n" + "\n".join(problems) + "\n(run: python tests/test_docs.py --fix)"
    )
    if path.name[0].isdigit():  # the numbered course pages each point at the lines they explain
        assert any(line for _, _, line in links(path)), f"{path.name} links to no line of code"


@pytest.fixture(scope="module")
def one_thread():
    import torch

    # One thread: the docs' models are tiny, and on a busy 2-core machine a second thread spends
    # its time waiting for the first (measured: about half the wall time of two threads here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reader_folder(tmp_path_factory, name: str) -> Path:
    """An empty folder, as on a fresh clone: nothing in it, no `../shared` beside it."""
    folder = tmp_path_factory.mktemp(name)
    assert not any(folder.iterdir()) and not (folder.parent / "shared").exists()
    return folder


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    """The guide reader's folder."""
    return reader_folder(tmp_path_factory, "guide")


@pytest.fixture(scope="module")
def readme_workdir(tmp_path_factory, one_thread):
    """The README reader's folder (its own: the READMEs' runs must not stand in for the guide's)."""
    return reader_folder(tmp_path_factory, "readme")


_already_run: dict[Path, set[str]] = {}


# `dozero train` in the guide shows real settings (2,000 steps take minutes); the test keeps the shape
# of each command but shrinks its step counts, so that the run folders later pages use still exist.
SHORT_TRAINING = {
    "--max-steps": "6",
    "--stop-after": "3",
    "--eval-interval": "3",
    "--warmup-steps": "1",
    "--eval-iters": "1",
    "--sample-tokens": "0",
}


def cheap(command: str) -> str:
    """The command as the test runs it: `doctor` without the slow compile probe, `train` shortened."""
    if command.startswith("dozero doctor") and "--skip-compile" not in command:
        command += " --skip-compile"
    if command.startswith("dozero train"):
        words = shlex.split(command)
        for flag, value in SHORT_TRAINING.items():
            if flag in words:
                words[words.index(flag) + 1] = value
            elif flag != "--stop-after" and not (flag == "--max-steps" and "--resume" in words):
                words += [flag, value]
        command = shlex.join(words)
    return command


@pytest.mark.slow
@pytest.mark.parametrize("path", all_pages(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_command_in_the_guide_runs(path, workdir, monkeypatch, capsys):
    run_commands(path, workdir, monkeypatch, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("path", READMES, ids=lambda p: p.name)
def test_every_command_in_the_readmes_runs(path, readme_workdir, monkeypatch, capsys):
    assert commands(path), f"{path.name} has no ```bash block of commands to run"
    run_commands(path, readme_workdir, monkeypatch, capsys)


def run_commands(path: Path, folder: Path, monkeypatch, capsys) -> None:
    """Each command of the page not yet run in `folder`, in order; each must exit 0."""
    from dozero.cli import main

    if not path.exists():
        pytest.skip("page missing (reported by another test)")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # The 400-token sample `dozero train` prints at the end is most of a 6-step run's time; the
    # training tests cover it, so here it is skipped (the run folders are written all the same).
    monkeypatch.setattr("dozero.train.loop.sample_text", lambda *args, **kwargs: "", raising=False)
    done = _already_run.setdefault(folder, set())
    for command in commands(path):
        command = cheap(command)
        if command in done:
            continue
        done.add(command)
        if SHELL_CHARS.search(command.replace("\\n", "")):
            env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
            result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, check=False)
            code, out, err = result.returncode, result.stdout, result.stderr
        else:
            try:
                code = main(shlex.split(command)[1:])
            except SystemExit as e:  # argparse rejected the command line
                code = e.code
            out, err = capsys.readouterr()
        assert code == 0, f"{path.relative_to(REPO)}: `{command}` exited {code}\n{out[-2000:]}\n{err[-2000:]}"


@pytest.mark.parametrize("path", [*READMES, *guide_files()], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_command_needs_the_projects_shared_folder(path):
    """`../shared` exists on the project's machines only; a user who cloned the repository has none."""
    if not path.exists():
        pytest.skip("page missing (reported by another test)")
    bad = [text for text in runnable_text(path) if "../shared" in text]
    assert not bad, f"{path.relative_to(REPO)} runs commands that need ../shared: {bad}"


def test_no_help_text_points_at_the_projects_shared_folder():
    import argparse

    from dozero.cli import build_parser

    def walk(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)

    parsers = list(walk(build_parser()))
    assert len(parsers) > 10  # every verb and action, not just the top level
    bad = [parser.prog for parser in parsers if "../shared" in parser.format_help()]
    assert not bad, f"--help of {bad} shows paths under ../shared, which users do not have"


def test_the_docs_text_is_shipped_and_named(tmp_path, monkeypatch, capsys):
    """`tinyshakespeare` reads the text inside the package from any folder; a file of that name wins."""
    from dozero.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["tokenizer", "stats", "tinyshakespeare"]) in (0, None)
    # 338,025 GPT-2 tokens: nanoGPT's data/shakespeare/prepare.py (301,966 train + 36,059 val, tiktoken)
    assert "tinyshakespeare: 1,115,394 bytes -> 338,025 tokens" in capsys.readouterr().out
    (tmp_path / "tinyshakespeare").write_text("To be, or not to be", encoding="utf-8")
    assert main(["tokenizer", "stats", "tinyshakespeare"]) in (0, None)
    assert "tinyshakespeare: 19 bytes -> 7 tokens" in capsys.readouterr().out


# ---- fixing anchors after code moved -----------------------------------------------------------


def fix_anchors() -> int:
    changed = 0
    for path in guide_files():
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")

        def repl(m: re.Match, path: Path = path) -> str:
            nonlocal changed
            name, rel, line = m.group(1), m.group(2), m.group(3)
            target = (path.parent / rel).resolve()
            if line is None or not target.is_file() or check_link(name, target, int(line)) is None:
                return m.group(0)
            found = find_definition(target.read_text(encoding="utf-8").splitlines(), name, int(line))
            if found is None:
                print(f"{path.relative_to(REPO)}: cannot find `{name}` in {rel}")
                return m.group(0)
            changed += 1
            return f"[`{name}`]({rel}#L{found})"

        new = LINK.sub(repl, text)
        if new != text:
            path.write_text(new, encoding="utf-8")
    print(f"{changed} anchors fixed")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        raise SystemExit(fix_anchors())
    for page in all_pages():
        for command in commands(page) if page.exists() else []:
            print(f"{page.relative_to(REPO)}: {command}")
