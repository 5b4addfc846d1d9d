"""dozero.files: atomic writes that leave the old file on failure, owner-named temporaries swept after kill -9,
output folders that are not dozero's refused, input walks that stop at symlink loops."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from dozero import files
from dozero.errors import DozeroError
from dozero.files import atomic_write, check_output_folder, find_files, glob_files


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_atomic_write_never_touches_the_umask(tmp_path, monkeypatch):
    def no_umask(mask):
        raise AssertionError("os.umask called during a write (it is process-wide: not thread-safe)")

    monkeypatch.setattr(os, "umask", no_umask)
    atomic_write(tmp_path / "a.txt", "hello")
    monkeypatch.undo()
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_stale_temps_of_dead_processes_are_swept_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".model.pt.{files._HOST}-{dead}.abcd1234.tmp"
    stale_dir = tmp_path / f".data.{files._HOST}-{dead}.zzzz9999.tmp"
    running = tmp_path / f".model.pt.{files._HOST}-{live}.efgh5678.tmp"
    other_host = tmp_path / f".model.pt.elsewhere-{dead}.ijkl9012.tmp"
    user_file = tmp_path / ".notes.tmp"
    stale_dir.mkdir()
    (stale_dir / "train_000000.bin").write_bytes(b"\0" * 8)
    for p in (stale_file, running, other_host, user_file):
        p.write_bytes(b"half")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    os.replace = spy
    try:
        atomic_write(tmp_path / "model.pt", b"whole")
    finally:
        os.replace = real_replace
    assert not stale_file.exists() and not stale_dir.exists()
    assert running.exists() and other_host.exists() and user_file.exists()
    assert files._TEMP.match(seen[0]) and f"-{os.getpid()}." in seen[0]  # our own temp names its owner
    assert (tmp_path / "model.pt").read_bytes() == b"whole"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch, code):
    target = tmp_path / "manifest.json"
    target.write_text("old")

    def fail(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError) as e:
        atomic_write(target, "new")
    assert e.value.errno == code  # `dozero.cli` shows it in one line (errors.os_error_message)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_check_output_folder(tmp_path):
    def ours(p):
        return (p / "manifest.json").is_file()

    check_output_folder(tmp_path / "new", "data folder", ours, force=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", "data folder", ours, force=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DozeroError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file", "data folder", ours, force=True)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(DozeroError, match="is not empty and is not a data folder.*--force"):
        check_output_folder(model, "data folder", ours, force=False)
    check_output_folder(model, "data folder", ours, force=True)
    (model / "manifest.json").write_text("{}")
    check_output_folder(model, "data folder", ours, force=False)


@pytest.mark.timeout(20)
def test_symlink_loops_are_errors_not_hangs(tmp_path):
    root = tmp_path / "corpus"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "x.txt").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("hidden")
    (root / "shared").mkdir()
    (root / "shared" / "y.txt").write_text("y")
    (root / "a" / "link1").symlink_to(root / "shared")  # two links to one folder: read once
    (root / "a" / "link2").symlink_to(root / "shared")
    assert find_files(root) == [root / "a/b/x.txt", root / "shared/y.txt"]
    # Two links up from one folder: Python's glob("**") never ends here (2^depth paths).
    (root / "a" / "b" / "up").symlink_to(root / "a")
    (root / "a" / "b" / "up2").symlink_to(root)
    with pytest.raises(DozeroError, match=r"b/up is a link back to .*a folder above it: a loop"):
        find_files(root)
    with pytest.raises(DozeroError, match="a loop"):
        glob_files(str(root / "**" / "*.txt"))


def test_glob_files_matches_like_glob(tmp_path, monkeypatch):
    import glob

    for name in ["a.txt", "b.md", "d/c.txt", "d/e/f.txt", "d/e/g.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.chdir(tmp_path)
    for pattern in ["**/*.txt", "d/**/*.txt", "d/**", "*.md", "d/*/*.jsonl", str(tmp_path / "**" / "f.txt")]:
        expected = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert [str(p) for p in glob_files(pattern)] == expected, pattern


def test_iter_jsonl_numbers_lines_and_names_bad_ones(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2, 3]\n"x"\n', encoding="utf-8")
    assert list(files.iter_jsonl(path)) == [(1, {"a": 1}), (4, [2, 3]), (5, "x")]  # blank lines skipped, counted
    path.write_text('{"a": 1}\n{"a": }\n', encoding="utf-8")
    with pytest.raises(DozeroError, match=r"d\.jsonl:2: not valid JSON \(Expecting value at column 7\)$"):
        list(files.iter_jsonl(path))
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(DozeroError, match=r"d\.jsonl: not UTF-8 text \(invalid start byte\); save it as UTF-8"):
        list(files.iter_jsonl(path))
