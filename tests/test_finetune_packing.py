"""Packing (dozero.finetune.packing): a packed batch gives each conversation the logits and the loss it has
alone, no attention crosses a conversation's boundary, and a packed run trains as a padded one does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dozero.config import ModelConfig, get_model_config
from dozero.finetune.data import IGNORE, SFTLoader, collate
from dozero.finetune.packing import PackedForward, collate_packed, document_mask, pack_rows
from dozero.model.gpt import GPTModel

GPT2 = ModelConfig(vocab_size=96, context_length=40, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
LLAMA = dataclasses.replace(get_model_config("llama-char"), vocab_size=96, emb_dim=32, n_heads=4, n_kv_heads=2,
                            n_layers=2, ff_hidden_dim=48, context_length=40)  # fmt: skip


def conversations(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of the given lengths; the second half of each is the 'answer' (mask 1)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for n in lengths:
        ids = torch.randint(0, 96, (n,), generator=g).tolist()
        batch.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))
    return batch


def test_rows_are_filled_first_fit_within_the_window():
    assert pack_rows([10, 31, 25, 5, 15], window=40) == [[0, 2, 3], [1], [4]]
    x, y = collate_packed(conversations([7, 12, 5]), pad_id=3, window=15)
    assert x.shape == (2, 2, 11) and y.shape == (2, 11)  # rows of 6 + 4 and 11 positions; W = the longest
    assert x[0, 1].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0]  # positions restart; padding at 0
    assert x[0, 0, 10] == 3 and y[0, 10] == IGNORE and x[1, 1].tolist() == list(range(11))


def test_the_mask_is_block_diagonal_and_causal():
    mask = document_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0].int()
    assert mask.tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2-learned-positions", "llama-rope"])
def test_packed_logits_and_loss_equal_each_conversation_alone(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    batch = conversations([9, 17, 6, 11])
    x, y = collate_packed(batch, pad_id=0, window=32)
    assert x.shape[0] == 2  # 8 + 16 + 5 positions in one row, 10 in the next
    with torch.no_grad():
        packed = PackedForward(model)(x)  # (R, W, V)
        rows = pack_rows([len(ids) - 1 for ids, _ in batch], 32)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(batch[i][0]) - 1
                alone = model(torch.tensor([batch[i][0][:-1]]))[0]  # (n, V), its own row from position 0
                torch.testing.assert_close(packed[r, at : at + n], alone, rtol=0, atol=1e-5)
                at += n
        padded_x, padded_y = collate(batch, pad_id=0)
        padded_loss = F.cross_entropy(model(padded_x).flatten(0, 1), padded_y.flatten())
        packed_loss = F.cross_entropy(packed.flatten(0, 1), y.flatten())
    assert (y != IGNORE).sum() == (padded_y != IGNORE).sum()  # the same answer tokens are scored
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_no_attention_crosses_a_boundary(cfg):
    torch.manual_seed(0)
    model = GPTModel(cfg).eval()
    batch = conversations([9, 17, 6])
    x, _ = collate_packed(batch, pad_id=0, window=40)  # one row: 8 | 16 | 5 positions, then 0 padding
    ids, positions = x[:, 0], x[:, 1]
    with torch.no_grad():
        _, weights = model(ids, position_ids=positions, attn_mask=document_mask(positions), return_attention=True)
        for w in weights:  # (1, nh, W, W): weight of conversation 2's queries on conversation 1's keys, etc.
            assert w[..., 8:24, :8].abs().max() == 0 and w[..., 24:29, :24].abs().max() == 0
        changed = ids.clone()
        changed[0, :8] = (changed[0, :8] + 1) % 96  # another first conversation
        before, after = PackedForward(model)(x), PackedForward(model)(torch.stack([changed, positions], dim=1))
    assert not torch.equal(before[0, :8], after[0, :8])
    assert torch.equal(before[0, 8:29], after[0, 8:29])  # the others do not see it, bit for bit


def test_a_packed_training_step_equals_a_padded_one():
    """Same conversations per batch, same mean over the same answer tokens: the gradients agree."""
    batch = conversations([9, 17, 6, 11, 14, 5], seed=1)
    grads = []
    for window in (0, 40):
        torch.manual_seed(0)
        model = GPTModel(GPT2)
        x, y = SFTLoader(batch, 6, seed=0, pad_id=0, window=window).next_batch()
        F.cross_entropy(PackedForward(model)(x).flatten(0, 1), y.flatten()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].shape == grads[1].shape
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
