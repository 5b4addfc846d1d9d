"""Batches: windows equal the slices they claim, ranks are disjoint, resume is exact, bad sizes are errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dozero.data.loader import RandomWindowLoader, SequentialWindowLoader
from dozero.errors import DozeroError


@pytest.fixture
def tokens() -> np.ndarray:
    # Distinct values make every window identifiable by its content.
    return np.random.default_rng(0).permutation(5000).astype(np.uint16)


def _find_start(tokens: np.ndarray, row: torch.Tensor) -> int:
    return int(np.flatnonzero(tokens == int(row[0]))[0])


def test_random_windows_are_slices_of_the_stream(tokens):
    loader = RandomWindowLoader(tokens, batch_size=8, context_length=32, seed=1)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y, strict=True):
            s = _find_start(tokens, row_x)
            assert row_x.tolist() == tokens[s : s + 32].tolist()
            assert row_y.tolist() == tokens[s + 1 : s + 33].tolist()  # teacher forcing: shifted by one


def test_same_seed_same_batches_other_seed_other_batches(tokens):
    a = [RandomWindowLoader(tokens, 4, 16, seed=7).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    b = RandomWindowLoader(tokens, 4, 16, seed=8).next_batch()[0]
    assert not torch.equal(a[0], b)


def test_ranks_never_share_a_window_and_together_equal_one_big_batch(tokens):
    world = 4
    ranks = [RandomWindowLoader(tokens, 16, 8, seed=3, rank=r, world_size=world) for r in range(world)]
    single = RandomWindowLoader(tokens, 16 * world, 8, seed=3)
    for _ in range(20):
        per_rank = [loader.next_batch()[0] for loader in ranks]
        starts = [tuple(row.tolist()) for x in per_rank for row in x]
        assert len(set(starts)) == len(starts) == 16 * world  # no window seen by two ranks (or twice)
        assert torch.equal(torch.cat(per_rank), single.next_batch()[0])


def test_state_dict_resume_gives_identical_next_batches(tokens):
    a = RandomWindowLoader(tokens, 4, 16, seed=5)
    for _ in range(7):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = RandomWindowLoader(tokens, 4, 16, seed=999)  # seed comes from the state
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (b.next_batch() for _ in range(3)), strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    # Resuming on 2 ranks with the same global batch continues the same global stream.
    halves = [RandomWindowLoader(tokens, 2, 16, seed=0, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    assert torch.equal(torch.cat([h.next_batch()[0] for h in halves]), expected[0][0])


def test_resume_with_other_global_batch_is_an_error(tokens):
    state = RandomWindowLoader(tokens, 4, 16, seed=5).state_dict()
    with pytest.raises(DozeroError, match="global batch of 4"):
        RandomWindowLoader(tokens, 8, 16, seed=5).load_state_dict(state)


def test_context_longer_than_split_is_a_clear_error(tokens):
    with pytest.raises(DozeroError, match=r"context length 5,000 needs at least 5,001 tokens.*has only 5,000"):
        RandomWindowLoader(tokens, 1, 5000, seed=0)
    with pytest.raises(DozeroError, match="context length 6,000"):
        SequentialWindowLoader(tokens[:100], 1, 6000)
    with pytest.raises(DozeroError, match="distinct windows"):
        RandomWindowLoader(tokens[:20], 8, 16, seed=0)


def test_sequential_windows_follow_the_course_dataset(tokens):
    T, stride = 10, 7
    loader = SequentialWindowLoader(tokens, batch_size=6, context_length=T, stride=stride)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    expected_starts = list(range(0, len(tokens) - T, stride))  # GPTDatasetV1's loop
    assert len(x) == loader.num_windows == len(expected_starts) and len(xs) == len(loader)
    for row_x, row_y, s in zip(x, y, expected_starts, strict=True):
        assert row_x.tolist() == tokens[s : s + T].tolist() and row_y.tolist() == tokens[s + 1 : s + T + 1].tolist()


def test_sequential_ranks_split_every_window_once(tokens):
    T = 16
    whole = torch.cat([x for x, _ in SequentialWindowLoader(tokens, 5, T)])
    parts = [torch.cat([x for x, _ in SequentialWindowLoader(tokens, 5, T, rank=r, world_size=3)]) for r in range(3)]
    assert sum(len(p) for p in parts) == len(whole)
    assert sorted(map(tuple, torch.cat(parts).tolist())) == sorted(map(tuple, whole.tolist()))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_memmap_input(tmp_path, tokens):
    path = tmp_path / "t.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    x, _ = RandomWindowLoader(mm, 4, 16, seed=2).next_batch()
    assert torch.equal(x, RandomWindowLoader(tokens, 4, 16, seed=2).next_batch()[0])


def test_sharded_tokens_read_like_one_array(tokens):
    from dozero.data.shards import ShardedTokens

    sharded = ShardedTokens([tokens[:300], tokens[300:301], tokens[301:2000], tokens[2000:]])
    assert len(sharded) == len(tokens) and sharded[299] == tokens[299] and sharded[-1] == tokens[-1]
    assert np.array_equal(sharded[250:2100], tokens[250:2100]) and np.array_equal(sharded[:], tokens)
    starts = np.random.default_rng(0).integers(0, len(tokens) - 64, size=200)
    assert np.array_equal(sharded.windows(starts, 64), tokens[starts[:, None] + np.arange(64)])  # crossings too
    a = RandomWindowLoader(sharded, 8, 63, seed=4).next_batch()
    b = RandomWindowLoader(tokens, 8, 63, seed=4).next_batch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
