"""--chat: put each question inside the model's chat template, as a chat model sees a user's turn.

The tokenizer's own template is used when it carries one (a GGUF model's `tokenizer.chat_template`,
a Jinja2 text, rendered with `add_generation_prompt`); otherwise ChatML, the format of SmolLM2 and
Qwen instruct models:

    <|im_start|>user
    {question}<|im_end|>
    <|im_start|>assistant
    {the answer is scored here}
"""

from __future__ import annotations

from dozero.errors import DozeroError

CHATML = "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt(tokenizer, question: str) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return CHATML.format(question=question)
    try:
        import jinja2
    except ImportError:
        raise DozeroError("this model's chat template needs jinja2: pip install jinja2") from None
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": question}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")


def wrap_chat(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(context, continuation) pairs with each context made a user turn and the answer the assistant's."""
    return [(chat_prompt(tokenizer, context), continuation.lstrip(" ")) for context, continuation in pairs]
