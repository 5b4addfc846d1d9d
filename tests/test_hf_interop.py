"""dozero <-> Hugging Face GPT-2: logits agree after loading HF folders (safetensors, .bin, the old key
layout, an untied head) and after dozero writes a folder that transformers loads without warnings."""

from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from dozero.config import ModelConfig  # noqa: E402
from dozero.errors import DozeroError  # noqa: E402
from dozero.model.checkpoint import load_model, save_model  # noqa: E402
from dozero.model.gpt import GPTModel  # noqa: E402

transformers.logging.set_verbosity_error()  # its config warnings about bos/eos ids for tiny vocabularies

# (n_layer, n_head, n_embd, vocab_size, n_positions): GPT-2's proportions, and odd ones.
SHAPES = [(3, 6, 96, 1000, 64), (2, 4, 64, 257, 32), (1, 1, 8, 17, 16)]


def hf_model(n_layer, n_head, n_embd, vocab, ctx, tie=True, seed=0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=ctx,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF initializes biases and LayerNorms to 0/1; random values test the mapping
        for name, p in model.named_parameters():
            if not name.endswith("wte.weight"):
                p.add_(torch.randn_like(p) * 0.05)
        if not tie:
            model.lm_head.weight.normal_(0, 0.02)
    return model


def dozero_model(shape, seed: int, noise: float, **config) -> GPTModel:
    """A dozero model of `shape` (n_layer, n_head, n_embd, vocab, n_positions) with every parameter
    moved off its initial value by N(0, noise), so biases and norms test the mapping too."""
    n_layer, n_head, n_embd, vocab, ctx = shape
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, context_length=ctx, emb_dim=n_embd, n_heads=n_head, n_layers=n_layer,
                      **config)  # fmt: skip
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def assert_same_logits(ours: GPTModel, theirs: GPT2LMHeadModel, vocab: int, ctx: int) -> None:
    torch.manual_seed(1)
    for B, T in [(2, ctx), (3, max(1, ctx // 3))]:
        x = torch.randint(0, vocab, (B, T))
        with torch.no_grad():
            expected = theirs(x).logits
            got = ours(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}h{}C{}V{}T{}".format(*s))
def test_load_hf_safetensors(tmp_path, shape):
    theirs = hf_model(*shape)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    ours = load_model(tmp_path)
    assert ours.cfg.n_layers == shape[0] and ours.cfg.emb_dim == shape[2] and ours.cfg.tie_weights
    assert ours.out_head.weight is ours.tok_emb.weight
    assert ours.num_parameters() == theirs.num_parameters()
    assert_same_logits(ours, theirs, shape[3], shape[4])


def test_load_hf_sharded_safetensors(tmp_path):
    theirs = hf_model(*SHAPES[0])
    theirs.save_pretrained(tmp_path, max_shard_size="500KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_logits(load_model(tmp_path), theirs, 1000, 64)


def test_sharded_index_never_reads_outside_the_folder(tmp_path):
    """An index naming "../x", "/abs/x", or a shard that is a link out of the folder is refused (before,
    dozero read whatever file it named); a Hugging Face cache snapshot, whose files all link into the
    cache's blobs/, still loads."""
    import json
    import shutil

    theirs = hf_model(*SHAPES[0])
    good = tmp_path / "good"
    theirs.save_pretrained(good, max_shard_size="500KB")
    index = json.loads((good / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good / shard, outside / shard)

    def folder_whose_index_names(name: str, link: bool = False):
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, folder)
        if link:
            (folder / shard).unlink()
            (folder / shard).symlink_to(outside / shard)
        weight_map = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (folder / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
        return folder

    for name, link in [(f"../outside/{shard}", False), (str(outside / shard), False), (shard, True)]:
        folder = folder_whose_index_names(name, link)
        with pytest.raises(DozeroError, match=f"shard '{re.escape(name)}' lies outside the model folder"):
            load_model(folder)

    cache = tmp_path / "hub" / "models--x--y"  # huggingface_hub's layout: snapshots/<rev>/file -> ../../blobs/<hash>
    (cache / "blobs").mkdir(parents=True)
    snapshot = cache / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(good.iterdir())):
        shutil.copy(f, cache / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert_same_logits(load_model(snapshot), theirs, 1000, 64)


def test_load_hf_pytorch_bin(tmp_path):
    """An older folder: config.json + pytorch_model.bin (read with weights_only=True)."""
    theirs = hf_model(*SHAPES[0])
    theirs.config.save_pretrained(tmp_path)
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    assert_same_logits(load_model(tmp_path), theirs, 1000, 64)


def test_load_old_key_layout(tmp_path):
    """OpenAI-era checkpoints: no `transformer.` prefix, plus the attn.bias / attn.masked_bias buffers."""
    theirs = hf_model(*SHAPES[0])
    n_layer, ctx = theirs.config.n_layer, theirs.config.n_positions
    old = {k.removeprefix("transformer."): v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    for i in range(n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(ctx, ctx)).view(1, 1, ctx, ctx)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    theirs.config.save_pretrained(tmp_path)
    torch.save(old, tmp_path / "pytorch_model.bin")
    assert_same_logits(load_model(tmp_path), theirs, 1000, 64)


def test_untied_head_both_ways(tmp_path):
    theirs = hf_model(*SHAPES[1], tie=False)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert not ours.cfg.tie_weights and ours.out_head.weight is not ours.tok_emb.weight
    assert_same_logits(ours, theirs, 257, 32)
    save_model(ours, tmp_path / "back", format="hf")
    again, info = GPT2LMHeadModel.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not again.config.tie_word_embeddings
    assert all(not v for v in info.values()), info
    assert_same_logits(ours, again.eval(), 257, 32)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "L{}h{}C{}V{}T{}".format(*s))
def test_dozero_saves_hf_loads(tmp_path, shape, qkv_bias):
    vocab, ctx = shape[3], shape[4]
    ours = dozero_model(shape, seed=2, noise=0.05, qkv_bias=qkv_bias)
    save_model(ours, tmp_path, format="hf")
    theirs, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    # No missing, unexpected or mismatched keys: transformers initialized nothing at random.
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert theirs.config.tie_word_embeddings and theirs.lm_head.weight is theirs.transformer.wte.weight
    if not qkv_bias:  # OpenAI's layout always has a qkv bias: exported as zeros, the same function
        assert torch.count_nonzero(theirs.transformer.h[0].attn.c_attn.bias) == 0
    assert_same_logits(ours, theirs.eval(), vocab, ctx)
    # ...and back into dozero, unchanged.
    assert_same_logits(load_model(tmp_path), theirs, vocab, ctx)


@pytest.mark.parametrize("gelu, activation", [("tanh", "gelu_new"), ("none", "gelu")])
def test_gelu_choice_both_ways(tmp_path, gelu, activation):
    """The exact-GELU character presets export as HF's "gelu"; GPT-2's tanh GELU as "gelu_new"."""
    vocab, ctx = SHAPES[1][3], SHAPES[1][4]
    ours = dozero_model(SHAPES[1], seed=3, noise=0.5, gelu_approximation=gelu)  # large: the GELUs differ visibly
    save_model(ours, tmp_path / "hf", format="hf")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.activation_function == activation
    assert_same_logits(ours, theirs, vocab, ctx)
    assert load_model(tmp_path / "hf").cfg.gelu_approximation == gelu
    # The choice matters: the same weights with the other GELU give other logits.
    theirs.config.activation_function = "gelu" if gelu == "tanh" else "gelu_new"
    theirs.save_pretrained(tmp_path / "other")
    with pytest.raises(AssertionError):
        assert_same_logits(ours, GPT2LMHeadModel.from_pretrained(tmp_path / "other").eval(), vocab, ctx)


def test_hf_config_with_unsupported_options(tmp_path):
    theirs = hf_model(*SHAPES[2])
    theirs.config.scale_attn_by_inverse_layer_idx = True
    theirs.save_pretrained(tmp_path)
    with pytest.raises(DozeroError, match="scale_attn_by_inverse_layer_idx"):
        load_model(tmp_path)
    theirs.config.scale_attn_by_inverse_layer_idx = False
    theirs.config.activation_function = "relu"
    theirs.save_pretrained(tmp_path)
    with pytest.raises(DozeroError, match="activation_function 'relu' unsupported"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("vocab_size", "100", "vocab_size must be a whole number, got '100'"),
        ("n_embd", None, "n_embd must be a whole number, got None"),
        ("n_head", 4.5, "n_head must be a whole number, got 4.5"),
        ("n_positions", True, "n_positions must be a whole number, got True"),
        ("layer_norm_epsilon", "1e-5", "layer_norm_epsilon must be a number, got '1e-5'"),
    ],
)
def test_hf_config_with_values_of_the_wrong_type(key, value, message):
    """A hand-edited config.json: one line naming the key, not a TypeError from deep inside."""
    from dozero.model.hf import config_from_hf

    hf = {"model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 16}
    with pytest.raises(DozeroError, match=f"config.json: {re.escape(message)}"):
        config_from_hf({**hf, key: value})


def test_hf_folder_with_missing_layer(tmp_path):
    theirs = hf_model(*SHAPES[1])
    theirs.config.save_pretrained(tmp_path)
    state = {k: v for k, v in theirs.state_dict().items() if ".h.1." not in k}
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(DozeroError, match=r"missing tensor 'h\.1\.ln_1\.weight'"):
        load_model(tmp_path)
