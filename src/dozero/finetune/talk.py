"""`dozero chat`: talk with a model in the terminal, turn by turn, the answer streamed as it is written.

    dozero chat --model smollm2-135m-instruct
    dozero chat --model runs/sft --system "Answer in Portuguese."

    from dozero.finetune.talk import ChatSession, load_chat_model
    model, tokenizer, template = load_chat_model("smollm2-135m-instruct")
    session = ChatSession(model, tokenizer, template, system="You are terse.")
    "".join(session.reply("What is the capital of France?"))      # 'The capital of France is Paris.'

The whole conversation is rendered with the model's chat template each turn (finetune/chat.py) and
must fit the context with room for the answer; when it does not, the oldest turns are dropped (the
system prompt stays) and `dropped` counts them, so the command can say so. Commands typed at the prompt:
/reset (forget the conversation), /save FILE (the conversation as one JSON line of {"messages": [...]},
the format `dozero finetune --data` reads), /quit. Ctrl-C stops the answer being written; Ctrl-D leaves.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from dozero.errors import DozeroError
from dozero.finetune.chat import end_of_turn, render_text


def load_chat_model(spec: str, adapter: str | None = None, device=None, keep_quantized: bool = False):
    """(model, tokenizer, chat template) of a model folder, run folder, GGUF file or short name;
    `adapter`: a LoRA adapter folder (dozero's or PEFT's) merged in; `keep_quantized`: see `load_model`."""
    from dozero.finetune.chat import chat_template
    from dozero.model.checkpoint import load_model, resolve_model_dir
    from dozero.tokenizer import load_tokenizer

    folder = resolve_model_dir(spec)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, device=device, keep_quantized=keep_quantized)
    tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
    if adapter:
        from dozero.finetune.lora import load_adapter, merge_lora

        merge_lora(load_adapter(model, adapter))
    model.eval()
    return model, tokenizer, chat_template(tokenizer, folder if folder.is_dir() else None)


class ChatSession:
    """A conversation with one model: the messages so far and how to get the next answer."""

    def __init__(self, model, tokenizer, template: str, system: str = "", config=None):
        from dozero.generate import GenerationConfig

        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.system = system
        config = config or GenerationConfig(temperature=0.0, max_new_tokens=256)
        # An answer may take at most half the context, so a small model still holds a question and its answer.
        limit = min(config.max_new_tokens, model.cfg.context_length // 2)
        self.config = dataclasses.replace(config, max_new_tokens=limit)
        end = end_of_turn(template, tokenizer)
        self.config.stop = tuple({*self.config.stop, end} - {""})
        self.messages: list[dict] = []
        self.dropped = 0

    def reset(self) -> None:
        self.messages, self.dropped = [], 0

    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fits(self, messages: list[dict]) -> str | None:
        """The rendered prompt of `messages` if it leaves room for the answer in the context, else None."""
        text = render_text(self.tokenizer, messages, self.template, add_generation_prompt=True)
        room = self.model.cfg.context_length - self.config.max_new_tokens
        return text if len(self.tokenizer.encode(text, special="allow")) <= room else None

    def prompt(self) -> str:
        """The rendered conversation ending where the next answer starts; oldest turns dropped to fit."""
        while (text := self._fits(self.conversation())) is None and len(self.messages) > 1:
            self.messages = self.messages[2:] if self.messages[1]["role"] == "assistant" else self.messages[1:]
            self.dropped += 2
        if text is None:
            raise DozeroError("the conversation does not fit the model's context")
        return text

    def ask(self, text: str) -> str:
        """Add the user's turn; return the prompt for the answer (oldest turns dropped if needed). A
        message that cannot fit even alone is refused, and the history is left as it was."""
        alone = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}
        ]
        if self._fits(alone) is None:
            raise DozeroError(
                f"the message does not fit the model's context of {self.model.cfg.context_length} tokens with "
                f"{self.config.max_new_tokens} left for the answer; shorten it or lower --max-new-tokens"
            )
        self.messages.append({"role": "user", "content": text})
        return self.prompt()

    def answer(self, prompt: str) -> Iterator[str]:
        """Yield the answer piece by piece. It joins the history when it ends, or, if the caller stops
        early (Ctrl-C), what was written of it so far."""
        from dozero.generate.stream import stream_batch

        answer = ""
        try:
            for _, piece in stream_batch(self.model, self.tokenizer, [prompt], self.config):
                answer += piece
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": answer.strip()})

    def reply(self, text: str) -> Iterator[str]:
        """`ask` then `answer`."""
        yield from self.answer(self.ask(text))

    def save(self, path: str) -> Path:
        path = Path(path).expanduser()
        if path.exists():
            raise DozeroError(f"{path} exists; give another file name")
        line = json.dumps({"messages": self.conversation()}, ensure_ascii=False)
        path.write_text(line + "\n", encoding="utf-8")
        return path


HELP = "commands: /reset (new conversation), /save FILE, /quit; Ctrl-C stops an answer, Ctrl-D leaves"


def repl(session: ChatSession, read=input, out=sys.stdout) -> int:
    """Read a line, answer it (streamed), until /quit or end of input."""
    out.write(f"chat with the model ({HELP})\n")
    while True:
        try:
            line = read("> " if out.isatty() else "").strip()
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n(Ctrl-D or /quit leaves)\n")
            continue
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            out.write("[conversation cleared]\n")
            continue
        if line.startswith("/save"):
            name = line[len("/save") :].strip()
            try:
                out.write(f"[saved to {session.save(name)}]\n" if name else "[usage: /save FILE]\n")
            except (DozeroError, OSError) as e:
                out.write(f"[not saved: {e}]\n")
            continue
        if line.startswith("/"):
            out.write(f"[unknown command {line.split()[0]}; {HELP}]\n")
            continue
        _answer(session, line, out)


def _answer(session: ChatSession, line: str, out) -> None:
    dropped = session.dropped
    try:
        prompt = session.ask(line)
    except DozeroError as e:
        out.write(f"[{e}]\n")
        return
    if session.dropped > dropped:
        out.write(f"[the conversation outgrew the context: its oldest {session.dropped - dropped} turns are dropped]\n")
    pieces = session.answer(prompt)
    try:
        written = ""
        for piece in pieces:
            piece = piece if written else piece.lstrip()
            written += piece
            out.write(piece)
            out.flush()
        out.write("\n")
    except KeyboardInterrupt:
        pieces.close()  # the partial answer stays in the history
        out.write(" [stopped]\n")
    out.flush()
