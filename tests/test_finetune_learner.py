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
