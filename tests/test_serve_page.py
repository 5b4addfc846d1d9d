"""The web chat page at /, driven in the system Chromium by Playwright: a message gets the streamed
greedy answer `dozero generate` gives for the page's system prompt and temperature, and Stop ends a
long answer and frees its sequence."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from tests.serve_helpers import ServerThread, small_model, wait_until_idle

from dozero.generate import generate
from dozero.serve.app import create_app
from dozero.serve.chat import chat_prompt
from dozero.serve.config import ServeConfig
from dozero.serve.engine import Engine
from dozero.tokenizer import load_tokenizer

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("/usr/bin/chromium is missing in CI: `make chromium` installs it")
        pytest.skip("no /usr/bin/chromium (make chromium installs it)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def test_chat_page_streams_an_answer_and_stops_a_long_one(browser, tmp_path):
    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer("gpt2"), small_model(context_length=1024)
    engine = Engine(model, tokenizer, ServeConfig(kv_cache_mb=16))
    step = engine.step
    engine.step = lambda: (time.sleep(0.01), step())  # slow decoding a little, so Stop lands mid-answer
    prompts, submit = [], engine.submit
    engine.submit = lambda ids, *rest: prompts.append(tokenizer.decode(ids)) or submit(ids, *rest)
    server = ServerThread(create_app(engine, "tiny"))
    try:
        page = browser.new_page(viewport={"width": 900, "height": 560})
        page.goto(server.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'", timeout=20_000)
        page.fill("#system", "You answer in rhymes.")  # the page's own system prompt, sent with each message
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "20")
        page.fill("#input", "Hello there")
        page.press("#input", "Enter")
        page.wait_for_selector(".assistant[data-done]", timeout=60_000)
        messages = [
            {"role": "system", "content": "You answer in rhymes."},
            {"role": "user", "content": "Hello there"},
        ]
        text, stops = chat_prompt(tokenizer, messages)
        expected = generate(model, tokenizer, text, temperature=0, max_new_tokens=20, stop=stops)
        assert page.eval_on_selector(".assistant", "e => e.textContent") == expected
        page.screenshot(path=str(tmp_path / "serve.png"))

        page.fill("#max_tokens", "900")
        page.fill("#input", "Tell me a long story")
        page.press("#input", "Enter")
        page.wait_for_function(
            "document.querySelectorAll('.assistant').length === 2 && "
            "document.querySelectorAll('.assistant')[1].textContent.length > 10",
            timeout=60_000,
        )
        page.click("#stop")
        # The page keeps the conversation: the second request carries the first exchange.
        assert prompts[1].startswith(text + expected) and "Tell me a long story" in prompts[1]
        page.wait_for_selector(".assistant:nth-of-type(4)[data-done]", timeout=30_000)
        assert page.is_enabled("#send") and not page.is_enabled("#stop")
        wait_until_idle(engine)  # the stopped answer's sequence was cancelled and its blocks freed
        assert engine.metrics.finished.get("cancelled") == 1
        assert engine.metrics.finished.get("length", 0) + engine.metrics.finished.get("stop", 0) == 1
    finally:
        server.stop()
        engine.close()
