"""Fine-tuning: chat templates and loss masks, supervised fine-tuning (SFT), LoRA, and `dozero chat`.

    from dozero.finetune.chat import render            # messages -> (ids, mask)
    from dozero.finetune.lora import apply_lora, merge_lora, save_adapter, load_adapter
    from dozero.finetune.sft import finetune            # what `dozero finetune` runs

Modules: `chat` (templates, masks, ChatML tokens for dozero's own tokenizers), `data` (OpenAI-messages and
Alpaca JSONL, validated line by line; batches with masked targets), `lora` (low-rank adapters, PEFT's file
layout), `sft` (the fine-tuning run, on the trainer's loop), `talk` (the terminal chat), `commands`
(`dozero finetune`, `dozero chat`). A fine-tuning stage sits after train: it imports train, never the reverse.
"""
