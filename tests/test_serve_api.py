"""`dozero serve`'s OpenAI API, driven by the official `openai` client against a real server on
127.0.0.1: answers equal `dozero generate`'s, streams end as OpenAI's do, errors use its schema."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from tests.serve_helpers import ServerThread, small_model, wait_until_idle

from dozero.errors import DozeroError
from dozero.generate import generate
from dozero.serve.app import create_app
from dozero.serve.chat import chat_prompt, read_chat_template
from dozero.serve.config import ServeConfig
from dozero.serve.engine import Engine
from dozero.tokenizer import load_tokenizer

KEY = "sk-test-key"
NAME = "tiny"


@pytest.fixture(scope="module")
def served():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer("gpt2")
    model = small_model()
    engine = Engine(model, tokenizer, ServeConfig(api_key=KEY, kv_cache_mb=4, max_tokens=64, max_body_kb=16))
    server = ServerThread(create_app(engine, NAME))
    yield server, engine, model, tokenizer
    server.stop()
    engine.close()
    torch.set_num_threads(threads)


@pytest.fixture
def client(served):
    server, engine, *_ = served
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    wait_until_idle(engine)  # after every test: all KV blocks back in the pool


def test_models_list(client):
    assert [m.id for m in client.models.list()] == [NAME]


def test_completion_equals_dozero_generate(client, served):
    _, _, model, tokenizer = served
    expected = generate(model, tokenizer, "The meaning of life is", temperature=0, max_new_tokens=12)
    out = client.completions.create(model=NAME, prompt="The meaning of life is", max_tokens=12, temperature=0)
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 12)
    ids = tokenizer.encode("The meaning of life is")
    out = client.completions.create(model=NAME, prompt=[ids, ids[:2]], max_tokens=12, temperature=0)
    assert out.choices[0].text == expected and len(out.choices) == 2
    # Seeded sampling: n choices use seeds seed, seed + 1.
    out = client.completions.create(model=NAME, prompt="Hi", max_tokens=8, temperature=1.0, seed=7, n=2)
    for j, choice in enumerate(out.choices):
        expected = generate(model, tokenizer, "Hi", temperature=1.0, top_k=None, seed=7 + j, max_new_tokens=8)
        assert choice.text == expected


def test_chat_with_and_without_stream(client, served):
    _, _, model, tokenizer = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text, stops = chat_prompt(tokenizer, messages)
    assert text.endswith("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    expected = generate(model, tokenizer, text, temperature=0, max_new_tokens=20, stop=stops)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_with_done(served, client):
    server = served[0]
    body = {"model": NAME, "prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_wrong_or_missing_api_key_is_401(served, client):
    bad = openai.OpenAI(base_url=served[0].url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    assert httpx.get(served[0].url + "/v1/models").status_code == 401


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "Hi", "temperature": 5}, 400, "temperature"),
        ({"prompt": "Hi", "max_tokens": 65}, 400, "max_tokens"),
        ({"prompt": "Hi " * 200}, 400, None),  # longer than the context
        ({"prompt": "Hi " * 120}, 400, "max_tokens"),  # prompt + max_tokens past the context
        ({"prompt": "Hi", "n": 9}, 400, "n"),
        ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "Hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": [], "max_tokens": 3}, 400, "prompt"),
        ({"prompt": [50257]}, 400, "prompt"),  # a token id the vocabulary does not have
        ({"prompt": "Hi", "logprobs": 2}, 400, "logprobs"),
    ],
)
def test_invalid_requests_get_openai_errors(served, client, body, status, param):
    r = httpx.post(served[0].url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_and_huge_bodies(served, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(served[0].url + "/v1/chat/completions", content=b'{"messages": [', headers=headers)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(served[0].url + "/v1/completions", content=b"x" * 20_000, headers=headers)
    assert r.status_code == 413
    assert httpx.get(served[0].url + "/nowhere").json()["error"]["message"] == "Not Found"


def test_health_and_metrics(served, client):
    client.completions.create(model=NAME, prompt="Hi", max_tokens=3, temperature=0)
    assert httpx.get(served[0].url + "/health").json() == {"status": "ok"}
    text = httpx.get(served[0].url + "/metrics").text
    assert 'dozero_requests_total{finish_reason="length"}' in text
    assert "dozero_time_to_first_token_seconds_bucket" in text
    assert "dozero_kv_cache_blocks_used 0" in text and "dozero_queue_length 0" in text


def test_chat_template_of_the_tokenizer_is_used_when_it_has_one():
    class Templated:
        chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]"
        special_tokens = {"<|endoftext|>": 0}
        eot_id = 0

    text, stops = chat_prompt(Templated(), [{"role": "user", "content": "Hi"}])
    assert (text, stops) == ("[user] Hi\n[assistant]", ())
    strict = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    with pytest.raises(DozeroError, match="refused these messages: user first"):
        chat_prompt(Templated(), [{"role": "assistant", "content": "Hi"}], template=strict)


def test_chat_template_is_read_from_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert read_chat_template(tmp_path) == "{{ messages[0].content }}!"
    assert read_chat_template(tmp_path / "nowhere") is None


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from dozero.cli import main
    from dozero.model.checkpoint import save_model

    folder = save_model(small_model(), tmp_path / "tiny", tokenizer=load_tokenizer("gpt2"))
    assert main(["serve", "--model", str(folder), "--kv-cache-mb", "0.01"]) == 2
    assert "give at least --kv-cache-mb" in capsys.readouterr().err
    assert main(["serve", "--model", str(folder), "--max-batch", "0"]) == 2
    assert "max_batch must be a whole number >= 1" in capsys.readouterr().err


def test_a_vocabulary_without_chatml_characters_gets_a_plain_script():
    from dozero.tokenizer.char import CharTokenizer

    shakespeare = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:!?\n")
    messages = [{"role": "system", "content": "Speak well."}, {"role": "user", "content": "Hi!"}]
    text, stops = chat_prompt(shakespeare, messages)
    assert (text, stops) == ("Speak well.\n\nUser: Hi!\nAssistant:", ("\nUser:",))
    shakespeare.encode(text)  # every character is in the vocabulary


def test_a_backlog_goes_out_as_one_chunk_per_choice_and_events_wake_the_loop_once():
    """A stream that fell behind sends its queued text as one chunk (then the finish chunk, [DONE]);
    the engine thread's events of one step reach the loop in one wake-up."""
    import asyncio
    import threading

    from dozero.serve.app import emitter, stream_events
    from dozero.serve.sequence import Event

    class Seq:
        def cancel(self):
            pass

    async def main():
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        wakeups, call_soon = [], loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(a) or call_soon(*a)
        emits = [emitter(loop, events, 0), emitter(loop, events, 1)]

        def engine_step():  # three tokens of choice 0, one of choice 1, then both end
            for i, text in ((0, "Hel"), (0, "lo"), (1, "Hi"), (0, "!"), (0, ""), (1, "")):
                emits[i](Event(text, None if text else "length", 1, 3 - 2 * i))

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()
        head = {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": NAME}
        return wakeups, [c async for c in stream_events([Seq(), Seq()], events, head, 2, True)]

    wakeups, chunks = asyncio.run(main())
    assert len(wakeups) == 1
    lines = [json.loads(line[6:]) for line in "".join(chunks[:-1]).split("\n\n") if line]
    got = [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"]) for c in lines[:-1]]
    assert got == [(0, "Hello!", None), (0, "", "length"), (1, "Hi", None), (1, "", "length")]
    assert lines[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert chunks[-1] == "data: [DONE]\n\n"


def test_a_finished_event_loop_and_its_mailbox_are_freed():
    """The mailboxes are kept per loop in a weak dictionary; the mailbox must not hold its loop alive
    (one leaked loop per TestClient or server restart in a process)."""
    import asyncio
    import gc

    from dozero.serve.app import _MAILBOXES, emitter

    gc.collect()
    before = len(_MAILBOXES)
    loop = asyncio.new_event_loop()
    emit = emitter(loop, asyncio.Queue(), 0)
    assert len(_MAILBOXES) == before + 1
    loop.close()
    del loop, emit
    gc.collect()
    assert len(_MAILBOXES) == before
