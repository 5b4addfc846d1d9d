"""Tokens -> text as it is produced, with stop strings, for the CLI and for `dozero.generate.stream`.

A byte-level BPE token can hold part of a character: GPT-2 spells many emoji and CJK characters
with two or three tokens, and no single one of them decodes to text. `TextSink` therefore feeds the
bytes of each token into an incremental UTF-8 decoder that holds an incomplete character back until
its last byte arrives; the streamed pieces then join to exactly `tokenizer.decode(all_ids)`.

It also holds back text that might be the start of a stop string ("\\n\\n" when only "\\n" has come
so far), so streamed text never has to be taken back.

    >>> for piece in stream(model, tokenizer, "Once upon a time", max_new_tokens=20):
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator

from dozero.errors import DozeroError
from dozero.generate.engine import GenerationConfig, encode_prompt, generate_tokens, generation_mode


class TextSink:
    """One sample's text: add tokens, get back the text that is safe to show."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = stop
        self.held = ""  # decoded text not shown yet: it may be the start of a stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Feed one token; returns the new text that can be shown (often "", never text to take back)."""
        return self._release(self.utf8.decode(self.tokenizer.decode_bytes([token_id])))

    def close(self) -> str:
        """The end of the sample: whatever is still held (an unfinished character becomes U+FFFD)."""
        text = self._release(self.utf8.decode(b"", final=True))
        if not self.stopped:
            text, self.held = text + self.held, ""
        return text

    def _release(self, new_text: str) -> str:
        if self.stopped:
            return ""
        text = self.held + new_text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:  # a stop string: show the text before it, and nothing after
            self.stopped, self.held = True, ""
            return text[:cut]
        hold = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - hold :]
        return text[: len(text) - hold]


def stream_batch(model, tokenizer, prompts: list[str], config: GenerationConfig) -> Iterator[tuple[int, str]]:
    """Yield (prompt index, new text) as the samples grow; every sample ends with its final piece."""
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise DozeroError(
            f"prompt {bad} is a {type(prompts[bad]).__name__}, not text; prompts are strings (for token ids: "
            "dozero.generate.engine.generate_ids)"
        )
    tokenizer.check_fits_model(model.cfg.vocab_size)
    ctx = model.cfg.context_length
    ids = [encode_prompt(tokenizer, p, ctx) for p in prompts]
    sinks = [TextSink(tokenizer, config.stop) for _ in prompts]
    finished = [False] * len(prompts)
    with generation_mode(model):
        # Only the tokenizer's ids are drawn: a model padded to more rows (50,304) never yields one it cannot decode.
        steps = generate_tokens(model, ids, config, tokenizer.eot_id, finished, num_tokens=tokenizer.vocab_size)
        for tokens in steps:
            for b, t in enumerate(tokens):
                if t is None:
                    continue
                text = sinks[b].add(t)
                finished[b] = sinks[b].stopped
                if text:
                    yield b, text
    for b, sink in enumerate(sinks):
        text = sink.close()
        if text:
            yield b, text
