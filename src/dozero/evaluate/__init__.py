"""Evaluation: benchmarks scored as lm-evaluation-harness scores them, perplexity, and a report card.

    dozero eval --model RUN --tasks hellaswag,arc_easy --limit 200     (commands.py)

    from dozero.evaluate.harness import EvalConfig, evaluate_model
    report = evaluate_model(model, tokenizer, EvalConfig(tasks="hellaswag", limit=100))

Modules, in the order a question travels: data.py (offline benchmark files) -> tasks.py (task
definitions as data: prompt, choices, answer) and usertasks.py (your .jsonl) -> scoring.py
(log-likelihoods, batched) -> metrics.py -> harness.py (runs tasks) -> report.py (JSON, Markdown,
comparisons); generative.py + sandbox.py for GSM8K and HumanEval; chat.py for --chat.
"""
