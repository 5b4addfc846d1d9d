"""Alignment: preference data, DPO, a reward model, and reinforcement learning from feedback (GRPO-style).

    dozero align dpo    --model M --data pairs.jsonl      preference pairs, no reward model (align/dpo.py)
    dozero align reward --model M --data pairs.jsonl      a scalar-head reward model, Bradley-Terry (align/reward.py)
    dozero align rl     --model M --task T                 rollouts, group-normalized advantages, KL (align/rl.py)

Modules: `data` (pair JSONL validated line by line; self-made pairs), `logprobs` (answer-only
log-probabilities), `rollout` (k samples per prompt through the batched KV-cache engine), `step` (a
loss-agnostic step and run on the trainer's loop), `dpo`, `reward`, `rl`, `commands`. Alignment sits after
fine-tuning: it reuses its chat templates, masks and LoRA, and the trainer's loop and checkpoints.
"""
