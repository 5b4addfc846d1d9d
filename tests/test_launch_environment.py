"""Issue 11's own case, not among test_runtime's: a stray WORLD_SIZE=2 with MASTER_ADDR set (no RANK,
no MASTER_PORT) used to hang without a word; `dozero train` must stop at once with one line naming them."""

from __future__ import annotations

import pytest

from dozero.cli import main

LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@pytest.mark.parametrize("port", [None, "29517"])
def test_stray_world_size_with_master_addr_is_one_line_before_anything_waits(tmp_path, monkeypatch, capsys, port):
    for var in LAUNCH:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    if port:
        monkeypatch.setenv("MASTER_PORT", port)
    run = tmp_path / "run"
    assert main(["train", "--out-dir", str(run), "--max-steps", "1", "--sample-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: WORLD_SIZE=2, MASTER_ADDR=127.0.0.1"), err
    missing = "RANK" if port else "RANK, MASTER_PORT"
    assert f"is set but not {missing}: launch with torchrun" in err, err
    assert not run.exists()  # refused before the run folder was made
