"""dozero: "LLM do Zero", a GPT-2-class language model built from scratch.

Pipeline, one subpackage per stage: tokenizer -> data -> model -> train -> generate.
Command line: `dozero --help`; Python: `from dozero.model import GPTModel`.
"""

__version__ = "0.1.0"
