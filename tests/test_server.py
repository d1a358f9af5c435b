"""`offload serve` end to end: the official openai client against a live server on the demo model, compared with
the Python API on the same folder; concurrency, disconnects, bad requests, the API key and the queue bound."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import offload
from offload.demo import demo_model
from offload.generate import common_prefix_length

openai = pytest.importorskip("openai", reason="the server is tested with the openai client: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx", reason="the server test makes its own HTTP calls: pip install -e '.[test]'")

MAX_CONTEXT = 256
STARTUP_SECONDS = 180  # the machine may be busy: loading is slow then, never wrong


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(base: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"offload serve exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} did not come up")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live `offload serve` on the demo model in a subprocess: (base URL, its stderr file)."""
    port = free_port()
    stderr = tmp_path_factory.mktemp("serve") / "stderr.txt"
    paths = [str(Path(offload.__file__).parent.parent), os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with open(stderr, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "offload.cli", "serve", str(demo_model()), "--port", str(port), "--device", "cpu",
             "--max-context", str(MAX_CONTEXT)], stdout=subprocess.DEVNULL, stderr=err, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(base, process)
        yield base, stderr
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model():
    """The same folder through the Python API: the reference for the server's replies."""
    return offload.load(demo_model(), device="cpu", max_context=MAX_CONTEXT)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["demo_model"]
    assert httpx.get(f"{server[0]}/health").json()["status"] == "ok"


def test_greedy_chat_equals_model_chat(client, model):
    messages = ask("What is a list comprehension?")
    reply = client.chat.completions.create(model="demo_model", messages=messages, max_tokens=24, temperature=0)
    expected = model.chat(messages, max_new_tokens=24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected.text
    assert choice.finish_reason == {"interrupted": "stop"}.get(expected.finish_reason, expected.finish_reason)
    assert reply.usage.prompt_tokens == len(model.chat_prompt(messages))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_sends_the_same_text_in_chunks(client, model):
    messages = ask("How do I open a file?")
    stream = client.chat.completions.create(model="demo_model", messages=messages, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == model.chat(messages, max_new_tokens=20).text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"],
                                                                                                      ["length"])
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].usage.prompt_tokens == len(model.chat_prompt(messages))


def test_completions_plain_and_streamed(client, model):
    prompt = "def fibonacci(n):"
    expected = model.generate(prompt, max_new_tokens=16, ignore_eos=True)
    reply = client.completions.create(model="demo_model", prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == expected.text and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 16
    stream = client.completions.create(model="demo_model", prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text
    ids = model.encode(prompt)
    by_ids = client.completions.create(model="demo_model", prompt=ids, max_tokens=16, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == expected.text


def test_stop_strings_end_the_reply_before_them(client, model):
    prompt = "The list type"
    full = model.generate(prompt, max_new_tokens=30, ignore_eos=True).text
    stop = full[len(full) // 2:][:3]
    assert stop.strip(), "the greedy continuation is too short"
    reply = client.completions.create(model="demo_model", prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                      extra_body={"ignore_eos": True})
    assert reply.choices[0].text == full[:full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_the_second_turn_reuses_the_first(client, model):
    turn1 = ask("What does the with statement do?")
    first = client.chat.completions.create(model="demo_model", messages=turn1, max_tokens=16, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": "Show an example."}]
    second = client.chat.completions.create(model="demo_model", messages=turn2, max_tokens=16, temperature=0)
    # What the server's caches held after turn 1: its prompt and every generated token fed back.
    reference = model.chat(turn1, max_new_tokens=16)
    held = model.chat_prompt(turn1) + reference.token_ids[:-1]
    prompt2 = model.chat_prompt(turn2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == common_prefix_length(held, prompt2, len(prompt2) - 1) >= len(model.chat_prompt(turn1))
    assert second.usage.prompt_tokens == len(prompt2)
    cold = model.chat(turn2, max_new_tokens=16, reuse_cache=False)
    assert second.choices[0].message.content == cold.text


def test_eight_concurrent_clients_get_what_they_get_alone(client, model):
    questions = [f"Question {i}: what is a {word}?" for i, word in
                 enumerate(["tuple", "set", "dict", "class", "module", "generator", "decorator", "lambda"])]
    alone = [model.chat(ask(q), max_new_tokens=12).text for q in questions]

    def one(q: str) -> str:
        return client.chat.completions.create(model="demo_model", messages=ask(q), max_tokens=12,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one, questions))
    assert together == alone


def metrics(base: str) -> dict:
    return httpx.get(f"{base}/metrics").json()


def wait_idle(base: str) -> dict:
    for _ in range(600):
        m = metrics(base)
        if m["queue"]["running"] == 0 and m["queue"]["waiting"] == 0:
            return m
        time.sleep(0.05)
    raise TimeoutError("the server stayed busy")


def test_a_client_that_leaves_mid_stream_frees_the_model(server, client):
    base = server[0]
    before = wait_idle(base)["requests"]["cancelled"]
    body = {"messages": ask("Tell me everything about Python."), "max_tokens": 200, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(8)) if line.startswith("data: ")]
    assert len(received) >= 3  # it was streaming when the client left
    after = wait_idle(base)
    assert after["requests"]["cancelled"] == before + 1
    assert after["last_generation"]["generated_tokens"] < 200  # stopped, not run to the end
    reply = client.chat.completions.create(model="demo_model", messages=ask("Still there?"), max_tokens=4)
    assert reply.choices[0].message.content is not None


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/chat/completions", {"messages": ask("hi"), "frobnicate": 1}, "unrecognized request argument"),
    ("/v1/chat/completions", {"model": "x"}, "messages is required"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages must be a list"),
    ("/v1/chat/completions", {"messages": [1]}, "messages[0] must be an object"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "42"}]}, "Unknown role"),  # the template's
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    ("/v1/chat/completions", {"messages": ask("hi " * 400)}, "maximum context length"),
    ("/v1/chat/completions", {"messages": ask("hi"), "max_tokens": -5}, "max_tokens must be at least 1"),
    ("/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 100000}, "maximum context length"),
    ("/v1/chat/completions", {"messages": ask("hi"), "max_tokens": True}, "max_tokens must be an integer"),
    ("/v1/chat/completions", {"messages": ask("hi"), "max_tokens": 5, "max_completion_tokens": 5}, "not both"),
    ("/v1/chat/completions", {"messages": ask("hi"), "temperature": -1}, "temperature must be"),
    ("/v1/chat/completions", {"messages": ask("hi"), "temperature": "hot"}, "temperature must be"),
    ("/v1/chat/completions", {"messages": ask("hi"), "top_p": 0}, "top_p must be greater than 0"),
    ("/v1/chat/completions", {"messages": ask("hi"), "top_k": -1}, "top_k must be"),
    ("/v1/chat/completions", {"messages": ask("hi"), "n": 2}, "one choice per request"),
    ("/v1/chat/completions", {"messages": ask("hi"), "frequency_penalty": 0.5}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": ask("hi"), "logprobs": True}, "log probabilities"),
    ("/v1/chat/completions", {"messages": ask("hi"), "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ("/v1/chat/completions", {"messages": ask("hi"), "seed": 2**70}, "seed must fit"),
    ("/v1/chat/completions", {"messages": ask("hi"), "response_format": {"type": "json_object"}}, "plain text"),
    ("/v1/chat/completions", {"messages": ask("hi"), "stream": "yes"}, "stream must be true or false"),
    ("/v1/completions", {"prompt": ""}, "prompt must be"),
    ("/v1/completions", {"prompt": [10, 99999999]}, "vocabulary"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    base, stderr = server
    for path, body, says in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = httpx.post(f"{base}{path}", content=content, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert says in error["message"] and error["type"] == "invalid_request_error", (body, error)
    assert httpx.get(f"{base}/v1/nowhere").status_code == 404
    assert httpx.get(f"{base}/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo_model", messages=ask("hi"), max_tokens=-1)
    assert client.chat.completions.create(model="demo_model", messages=ask("hi"), max_tokens=3).choices
    assert "Traceback" not in stderr.read_text()


def test_the_chat_page_is_self_contained(server):
    page = httpx.get(f"{server[0]}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


# --- an in-process server: the API key, the queue bound and tools, on a demo copy whose template shows tools ---

TOOL_TEMPLATE = ("{{ bos_token }}{% if tools %}<|system|>\nTools: {{ tools | tojson }}<|end|>\n{% endif %}"
                 "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
KEY = "sesame"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """(base URL, Model) of a server in this process with --api-key and room for two waiting requests."""
    import shutil

    import uvicorn
    from offload.server import ServerOptions, create_app

    folder = tmp_path_factory.mktemp("tools") / "demo"
    shutil.copytree(demo_model(), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TOOL_TEMPLATE}))
    model = offload.load(folder, device="cpu", max_context=MAX_CONTEXT)
    app = create_app(model, ServerOptions("demo", max_waiting=2, api_key=KEY))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    wait_until_up(base)
    yield base, model
    uv.should_exit = True
    thread.join(30)


def test_the_api_key_guards_the_api_but_not_the_page(keyed):
    base, _ = keyed
    assert httpx.get(f"{base}/v1/models").status_code == 401
    wrong = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()


def test_tools_reach_the_chat_template(keyed):
    base, model = keyed
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    reply = client.chat.completions.create(model="demo", messages=ask("What time is it?"), tools=tools,
                                           max_tokens=2)
    assert reply.usage.prompt_tokens == len(model.chat_prompt(ask("What time is it?"), tools=tools))
    assert reply.usage.prompt_tokens > len(model.chat_prompt(ask("What time is it?")))


def test_past_the_queue_bound_requests_get_429(keyed):
    """While the model is held, one request runs (blocked) and two wait; of eight clients the rest get a 429,
    and every admitted one then completes with the text it gets alone."""
    base, model = keyed
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)
    alone = client.chat.completions.create(model="demo", messages=ask("Hello"), max_tokens=6,
                                           temperature=0).choices[0].message.content
    outcomes: list[str] = []

    def one() -> None:
        try:
            reply = client.chat.completions.create(model="demo", messages=ask("Hello"), max_tokens=6, temperature=0)
            outcomes.append(reply.choices[0].message.content)
        except openai.RateLimitError as error:
            assert error.status_code == 429 and error.body["type"] == "rate_limit_error"
            outcomes.append("429")

    with model._lock:  # the running request waits for the model inside the worker thread
        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(o == "429" for o in outcomes) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    for t in threads:
        t.join(120)
    assert sorted(outcomes) == ["429"] * 5 + [alone] * 3
    assert httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()["requests"][
        "rejected"] == 5


def test_serve_refuses_a_port_in_use_and_an_empty_key_before_loading():
    from test_cli import assert_one_line_error, invoke

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(invoke("serve", demo_model(), "--port", port), f"127.0.0.1:{port}", "--port")
    assert_one_line_error(invoke("serve", demo_model(), "--api-key", " "), "--api-key is empty")
    assert_one_line_error(invoke("serve", demo_model(), "--host", "no.such.host.invalid"), "cannot serve on host")
