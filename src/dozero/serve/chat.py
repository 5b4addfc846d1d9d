"""Chat messages -> the prompt text a model continues, and the strings that end its answer.

If the tokenizer carries a chat template (a GGUF or Hugging Face model does), it is used, rendered
with Jinja in a sandbox as transformers does. Otherwise ChatML, the format of OpenAI's and
SmolLM2's chat models:

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant

A vocabulary that cannot spell ChatML's markers (a character model trained on Shakespeare has no
`<` or `|`) gets a plain script instead, which such a model can at least continue:

    You are helpful.

    User: Hi!
    Assistant:

Kept in this one function so the chat templates of fine-tuning can replace it later.
"""

from __future__ import annotations

from dozero.errors import DozeroError

CHATML_END = "<|im_end|>"


def _can_spell(tokenizer, text: str) -> bool:
    try:
        tokenizer.encode(text, special="allow")
    except DozeroError:
        return False
    return True


def read_chat_template(folder) -> str | None:
    """The `chat_template` of a Hugging Face model folder's tokenizer_config.json, if it has one."""
    import json
    from pathlib import Path

    path = Path(folder) / "tokenizer_config.json"
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None
    return template if isinstance(template, str) else None


def chat_prompt(tokenizer, messages: list[dict[str, str]], template: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(prompt text ending where the assistant's answer starts, stop strings that end the answer).
    `template`: a Jinja chat template (default: the tokenizer's own, if it carries one)."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template and _can_spell(tokenizer, "<|im_start|>assistant\n" + CHATML_END):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
        return text + "<|im_start|>assistant\n", (CHATML_END,)
    if not template:
        lines = [m["content"] + "\n" if m["role"] in ("system", "developer") else f"{m['role'].title()}: {m['content']}"
                 for m in messages]  # fmt: skip
        return "\n".join([*lines, "Assistant:"]), ("\nUser:",)
    return render_template(tokenizer, template, messages), (CHATML_END,) if CHATML_END in template else ()


def render_template(tokenizer, template: str, messages: list[dict[str, str]]) -> str:
    """A Hugging Face-style Jinja chat template, rendered in a sandbox (a template is code from the model's folder)."""
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DozeroError("this tokenizer has a chat template, which needs Jinja: pip install jinja2") from None

    def raise_exception(message):  # Hugging Face templates call it to refuse a conversation
        raise TemplateError(message)

    specials = {v: k for k, v in tokenizer.special_tokens.items()}
    eos = specials.get(tokenizer.eot_id, "")
    bos = specials.get(getattr(tokenizer, "bos_id", None), "")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    variables = {"messages": messages, "add_generation_prompt": True, "bos_token": bos, "eos_token": eos}
    try:
        return env.from_string(template).render(**variables)
    except TemplateError as e:
        raise DozeroError(f"the chat template refused these messages: {e}") from None
