"""Compression: quantization (quantize.py), pruning (prune.py) and distillation (distill.py) of a finished
model, each measured (report.py). `dozero compress METHOD` runs them (commands.py)."""
