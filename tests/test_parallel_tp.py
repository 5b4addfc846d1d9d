"""Tensor parallelism (--parallel tp, fsdp+tp): the fused rows' reordering, bad sizes, and the same
losses as one process (GPT-2 blocks: tests/test_parallel_dcp.py; Llama blocks here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dozero.config import get_model_config
from dozero.errors import DozeroError
from dozero.model.gpt import GPTModel

sys.path.insert(0, str(Path(__file__).parent))
from test_parallel import TINY, _losses, _run  # noqa: E402
from test_parallel_dcp import TOLERANCE, _shards, _torchrun  # noqa: E402


def test_rank_major_rows_give_each_rank_its_own_heads_keys_and_values():
    from dozero.parallel.tp import rank_major_rows

    # qkv of 4 query heads and 2 key/value heads (hs 1): rows q0 q1 q2 q3 | k0 k1 | v0 v1.
    order = rank_major_rows([4, 2, 2], 2).tolist()
    assert order == [0, 1, 4, 6, 2, 3, 5, 7]  # rank 0: q0 q1 k0 v0; rank 1: q2 q3 k1 v1
    assert rank_major_rows([3, 3], 1).tolist() == list(range(6))


def test_reordered_local_attention_computes_the_same_heads():
    """After reorder_for_tp, rank r's slice of qkv, with the local head counts, gives exactly the heads
    r*nh/N .. of the plain model (grouped-query attention included): checked without processes by
    running each rank's slice as a model of its own and comparing the attention outputs before out_proj."""
    from dozero.parallel.tp import reorder_for_tp

    cfg = get_model_config("llama-char")  # 4 query heads, 2 key/value heads
    torch.manual_seed(0)
    plain = GPTModel(cfg)
    x = torch.randn(2, 8, cfg.emb_dim)
    att = plain.trf_blocks[0].att
    heads = {}
    att.out_proj.register_forward_hook(lambda m, args, out: heads.setdefault("plain", args[0]))
    att(x)
    split = GPTModel(cfg)
    split.load_state_dict(plain.state_dict())
    optimizer = torch.optim.AdamW(split.parameters())
    reorder_for_tp(split, optimizer, 2)
    local = split.trf_blocks[0].att  # now counts 2 query heads and 1 key/value head
    reordered = local.qkv.weight.detach().clone()
    rows, width = reordered.shape[0] // 2, cfg.emb_dim // 2
    local.out_proj = torch.nn.Identity()  # what reaches out_proj: the heads, side by side
    for r in range(2):  # each rank's slice of qkv, run alone
        local.qkv = torch.nn.Linear(cfg.emb_dim, rows, bias=False)
        local.qkv.weight.data = reordered[r * rows : (r + 1) * rows]
        torch.testing.assert_close(local(x)[0], heads["plain"][..., r * width : (r + 1) * width])


def test_sizes_that_do_not_split_are_one_line_errors():
    from dozero.parallel.tp import check_divisible, tp_degree

    cfg = get_model_config("llama-char")  # 4 query heads, 2 key/value heads
    check_divisible(cfg, 2)
    with pytest.raises(DozeroError, match=r"splits the key/value heads \(2\) evenly, and 4 does not divide 2"):
        check_divisible(cfg, 4)
    with pytest.raises(DozeroError, match=r"query heads \(4\) evenly, and 3 does not"):
        check_divisible(cfg, 3)
    assert tp_degree("tp", 2, 8) == 8 and tp_degree("fsdp+tp", 2, 4) == 2 and tp_degree("fsdp", 2, 4) == 1
    for world in (3, 2):
        with pytest.raises(DozeroError, match=f"number of processes \\({world}\\) must be a multiple of it"):
            tp_degree("fsdp+tp", 2, world)


@pytest.mark.slow  # ~140 s on 2 cores: 1 + 4 + 2 + 2 processes
def test_llama_blocks_move_from_fsdp_tp_on_4_to_pp_on_2_to_tp_on_2(tmp_path):
    """Llama blocks (RMSNorm, RoPE, SwiGLU's fused gate|up, 4 query heads sharing 2 key/value heads, a
    tied head): fsdp+tp on a 2 x 2 mesh (steps 1-2) -> 2 pipeline stages (3-4) -> tp on 2 (5-6), each
    resuming the sharded checkpoint of the one before, take the same steps as 1 process throughout."""
    from dozero.model.info import parameter_breakdown
    from dozero.train.checkpoint import read_run_config

    common = ["--preset", "llama-char", *TINY, "--n-heads", "4", "--eval-interval", "2", "--max-steps", "6"]
    _run(["--out-dir", str(tmp_path / "one"), "--micro-batch-size", "8", *common])
    moved = tmp_path / "moved"
    fsdp_tp = ["--micro-batch-size", "4", "--parallel", "fsdp+tp", "--tp-size", "2", "--stop-after", "2"]
    _torchrun(4, 29641, ["--out-dir", str(moved), *fsdp_tp, *common])
    assert len(_shards(moved / "checkpoints" / "step_000002")) == 4
    out = _torchrun(
        2, 29642, ["--resume", str(moved), "--micro-batch-size", "8", "--parallel", "pp", "--stop-after", "4"]
    )
    # The whole model's parameters (the start line, MFU, report.md), not the first stage's.
    whole = parameter_breakdown(read_run_config(moved)[1])["total"]
    assert f"training {whole:,} parameters" in out, out[-2000:]
    _torchrun(2, 29643, ["--resume", str(moved), "--micro-batch-size", "8", "--parallel", "tp"])
    one, after = _losses(tmp_path / "one"), _losses(moved)
    assert sorted(one) == sorted(after) == list(range(1, 7))
    for s in one:
        assert after[s] == pytest.approx(one[s], abs=TOLERANCE), f"step {s}"
    assert one[6] < one[1] - 0.1
