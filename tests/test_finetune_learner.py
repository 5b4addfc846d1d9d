"""The learner's recipe of docs/en/fine-tuning.md at tiny size, through the CLI: a BPE tokenizer trained here,
a model pretrained by `dozero train`, then `dozero finetune` (full) on chat data. ChatML's two special
tokens join the vocabulary, the embedding and head grow two rows that start at the mean of the trained
rows (the documented initialization), and the fine-tuned run is a chat model with the grown vocabulary."""

from __future__ import annotations

import json

import torch

from dozero.cli import main
from dozero.finetune.chat import CHATML_TEMPLATE, IM_END, IM_START, render
from dozero.finetune.sft import load_base
from dozero.model.checkpoint import load_model, read_json
from dozero.tokenizer import load_tokenizer


def test_pretrained_bpe_model_takes_chat_tokens_and_fine_tunes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    lines = [
        f"On day {d} the king said to the queen: the date is {1950 + d}-0{d % 9 + 1}-1{d % 10}." for d in range(60)
    ]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines), encoding="utf-8")
    assert main(["tokenizer", "train", "corpus.txt", "--vocab-size", "300", "--out", "tok"]) == 0
    shape = ["--context-length", "48", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1"]
    run = ["--device", "cpu", "--micro-batch-size", "2", "--max-steps", "2", "--eval-interval", "2",
           "--warmup-steps", "1", "--tensorboard", "off"]  # fmt: skip
    pretrain = ["train", "--data", "corpus.txt", "--tokenizer", "tok", "--eval-iters", "1", "--sample-tokens", "0"]
    assert main(pretrain + shape + run + ["--out-dir", "base"]) == 0
    V = load_tokenizer("tok").vocab_size  # 300: 299 ids and <|endoftext|>

    model, tokenizer, template = load_base("base")
    assert template == CHATML_TEMPLATE
    assert (tokenizer.special_id(IM_START), tokenizer.special_id(IM_END)) == (V, V + 1)
    assert model.cfg.vocab_size == V + 2 and model.tok_emb.weight.shape == (V + 2, 16)
    trained = load_model("base").tok_emb.weight  # (V, 16), the pretrained rows
    assert torch.equal(model.tok_emb.weight[:V], trained)
    for new_row in (V, V + 1):
        assert torch.equal(model.tok_emb.weight[new_row], trained.mean(dim=0))
    assert model.out_head.weight is model.tok_emb.weight  # the head grew with it (tied)

    chats = [
        [{"role": "user", "content": f"date {d}?"}, {"role": "assistant", "content": f"{d}/03"}] for d in range(10)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    finetune = ["finetune", "--model", "base", "--data", "chat.jsonl", "--lora-rank", "0", "--lr", "1e-3",
                "--out-dir", "sft"] + run  # fmt: skip
    capsys.readouterr()
    assert main(finetune) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    tuned, tuned_tokenizer = load_model("sft"), load_tokenizer(tmp_path / "sft" / "latest")
    assert tuned.cfg.vocab_size == V + 2 and tuned_tokenizer.special_id(IM_END) == V + 1
    assert not torch.equal(tuned.tok_emb.weight[V + 1], trained.mean(dim=0))  # full fine-tuning moved the new row
    assert read_json(tmp_path / "sft" / "latest" / "config.json")["chat_template"] == CHATML_TEMPLATE
    ids, mask = render(tuned_tokenizer, chats[0], CHATML_TEMPLATE)
    assert ids.count(V) == 2 and sum(mask) > 0  # <|im_start|> opens both turns; the answer is scored
    assert tuned(torch.tensor([ids])).shape == (1, len(ids), V + 2)


def test_eval_chat_stops_at_the_end_of_turn_not_only_at_the_end_token(tmp_path, monkeypatch, capsys):
    """A dozero vocabulary grown with ChatML ends a turn with <|im_end|> while its end token stays
    <|endoftext|>: `dozero eval --chat` must stop the answer there (or an exact answer never matches)."""
    from dozero.config import ModelConfig
    from dozero.finetune.chat import add_chat_tokens
    from dozero.model.checkpoint import save_model
    from dozero.model.gpt import GPTModel
    from dozero.tokenizer import gpt2

    torch.manual_seed(0)
    tiny = ModelConfig(vocab_size=50257, context_length=64, emb_dim=16, n_heads=2, n_layers=1)
    tokenizer, model = add_chat_tokens(gpt2(), GPTModel(tiny))
    end = tokenizer.special_id(IM_END)
    with torch.no_grad():  # every position's final state is <|im_end|>'s own (long) row: it always comes next
        model.tok_emb.weight[end] = 1.0  # a long row (the others are N(0, 0.02))
        model.final_norm.scale.zero_()
        model.final_norm.shift.copy_(model.tok_emb.weight[end])
    save_model(model, tmp_path / "m", tokenizer=tokenizer)
    (tmp_path / "t.jsonl").write_text(json.dumps({"prompt": "2+2?", "answer": "", "check": "exact"}) + "\n")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = ["eval", "--model", str(tmp_path / "m"), "--tasks", str(tmp_path / "t.jsonl"), "--chat", "--samples"]
    assert main(args + ["--out", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    (sample,) = json.loads((tmp_path / "r.json").read_text())["results"][0]["samples"]
    assert sample["completion"] == "" and sample["exact_match"] == 1.0  # stopped at once, at <|im_end|>
