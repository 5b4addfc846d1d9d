"""Chat templates as text: OpenAI-style messages -> the prompt a chat model was tuned on.

    from dozero.tokenizer.chat_template import chat_template, render_text
    template = chat_template(tokenizer, model_folder)        # the model's own, else ChatML
    text = render_text(tokenizer, [{"role": "user", "content": "Hi"}], template, add_generation_prompt=True)

A chat template is tokenizer metadata (Hugging Face's tokenizer_config.json, a GGUF file's
`tokenizer.chat_template`), so the rendering lives here, below everything that uses it: `dozero generate
--chat` and fine-tuning's masks (finetune/chat.py) render the same text. ChatML, the default (OpenAI's
and SmolLM2's format), writes each turn as

    <|im_start|>user
    What is the capital of France?<|im_end|>
    <|im_start|>assistant

A template is Jinja text, rendered as transformers' `apply_chat_template` renders it (a sandbox with
trim_blocks, lstrip_blocks, loop controls, its `tojson` and `raise_exception`), so the text is the same
(tests/test_finetune_chat.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from dozero.errors import DozeroError

ROLES = ("system", "user", "assistant")
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML as a Jinja template (what SmolLM2's template is, without its default system prompt)."""


def chat_template(tokenizer, folder: str | Path | None = None) -> str:
    """The template a model was tuned with: its tokenizer's (GGUF metadata), its folder's
    (tokenizer_config.json or chat_template.jinja, as transformers saves it; config.json's "chat_template",
    as dozero saves it), else ChatML."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    if folder is not None and Path(folder).is_dir():
        folder = Path(folder)
        if (folder / "chat_template.jinja").is_file():
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        for name in ("tokenizer_config.json", "config.json"):
            try:
                found = json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(found, str) and found:
                return found
    return CHATML_TEMPLATE


def _environment():
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DozeroError("chat templates are Jinja text: pip install jinja2") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # transformers' settings (utils/chat_template_utils.py, _compile_jinja_template), so the text is the same.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


def special_text(tokenizer, token_id) -> str:
    specials = {i: t for t, i in getattr(tokenizer, "special_tokens", {}).items()}
    return specials.get(token_id, "")


def render_text(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (the text `apply_chat_template(tokenize=False)` gives)."""
    try:
        compiled = _environment().from_string(template)
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=special_text(tokenizer, getattr(tokenizer, "bos_id", None)),
            eos_token=special_text(tokenizer, tokenizer.eot_id),
        )
    except DozeroError:
        raise
    except Exception as e:  # a template error (jinja2.TemplateError, or its raise_exception)
        raise DozeroError(f"the chat template failed on this conversation: {e}") from None


def end_of_turn(template: str, tokenizer) -> str:
    """The text that closes a turn: ChatML's <|im_end|> when the template uses it, else the end token."""
    return IM_END if IM_END in template else special_text(tokenizer, tokenizer.eot_id)
