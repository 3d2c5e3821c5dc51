"""`tinygpt serve` over HTTP on loopback: the official `openai` client as the client, every
malformed request, 200 concurrent streams, disconnects, graceful shutdown, the page in Chromium."""
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from test_serve import make_world

from tinygpt.chat import encode_segments
from tinygpt.data.formats import Message
from tinygpt.generate import generate
from tinygpt.load import load_model_and_tokenizer
from tinygpt.serve.app import create_app
from tinygpt.serve.command import ServeOptions, build_service
from tinygpt.serve.worker import pipe_capacity
from tinygpt.stages.common import resolve_template, stop_ids

KEY = "sekrit-key"
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Server:
    """A real uvicorn server in a thread, on a loopback socket of its own."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "engine-process"])
def world(tmp_path_factory, request):
    """The server with its engine in the server's process, and in a process of its own (what
    `tinygpt serve` runs): every test below runs against both."""
    folder = tmp_path_factory.mktemp("serve")
    base, paths = make_world(folder, block_size=512)
    opts = ServeOptions(model=base, adapters=str(folder), device="cpu", max_batch=32, max_body=65536)
    service = build_service(opts, engine_process=request.param)
    server = Server(create_app(service, KEY, opts.max_body))
    torch.set_num_threads(1)
    yield {"url": server.url, "base": base, "paths": paths, "service": service, "folder": folder}
    server.stop()
    if request.param:
        assert not service.scheduler.proc.is_alive()        # the lifespan's close ended the engine


@pytest.fixture(scope="module")
def client(world):
    return openai.OpenAI(base_url=world["url"] + "/v1", api_key=KEY, max_retries=0)


_REFS: dict = {}


def ref_model(world, names):
    key = tuple(names)
    if key not in _REFS:
        paths = dict(zip(("a", "b"), world["paths"]))
        _REFS[key] = load_model_and_tokenizer(world["base"], lora=[(paths[n], w) for n, w in names])
    return _REFS[key]


def chat_ref(world, messages, max_new, names=()):
    """Greedy reply of the reference path: loader + template rule + `generate`."""
    model, tok = ref_model(world, names)
    paths = dict(zip(("a", "b"), world["paths"]))
    template = resolve_template(None, tok, world["base"], [paths[n] for n, _ in names])
    ids, _ = encode_segments(tok, template.render([Message(**m) for m in messages], add_generation_prompt=True))
    stops = set(stop_ids(tok, template))
    g = generate(model, [ids], max_new, temperature=0, stop_ids=stops, vocab_limit=tok.vocab_size)
    return tok.decode([t for t in g.tokens[0] if t not in stops], skip_special=True)


def text_ref(world, prompt, max_new, names=()):
    model, tok = ref_model(world, names)
    stops = set(tok.stop_ids())
    g = generate(model, [tok.encode(prompt)], max_new, temperature=0, stop_ids=stops, vocab_limit=tok.vocab_size)
    return tok.decode([int(t) for t in g.tokens[0] if int(t) not in stops])


HI = [{"role": "user", "content": "hi there"}]


# ---- the openai client ---------------------------------------------------------------------------
def test_models_health_and_page(world, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "a", "b"]
    assert client.models.retrieve("a").id == "a"
    health = httpx.get(world["url"] + "/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    page = httpx.get(world["url"] + "/")
    assert page.status_code == 200 and "<title>tinygpt chat</title>" in page.text
    paths = httpx.get(world["url"] + "/openapi.json").json()["paths"]      # the routes read their bodies
    for path, field in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert field in body["properties"] and body["additionalProperties"] is False


def test_chat_and_streaming_equal_the_reference(world, client):
    r = client.chat.completions.create(model="base", messages=HI, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == chat_ref(world, HI, 12)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(model="base", messages=HI, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def test_completions_logprobs_n_seed_stop(world, client):
    r = client.completions.create(model="base", prompt="Once upon", max_tokens=10, temperature=0, logprobs=3)
    text = r.choices[0].text
    assert text == text_ref(world, "Once upon", 10)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == text and len(lp.token_logprobs) == r.usage.completion_tokens
    for tok_text, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and value <= 0 and abs(max(top.values()) - value) < 1e-5   # greedy: the top one
    tiny = client.completions.create(model="base", prompt="Once upon", max_tokens=10, temperature=1e-7, logprobs=1)
    assert tiny.choices[0].text == text and all(v == v for v in tiny.choices[0].logprobs.token_logprobs)  # no NaN
    stop = text[3:5]
    cut = client.completions.create(model="base", prompt="Once upon", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    a = client.completions.create(model="base", prompt=["x", "y"], max_tokens=8, n=3, seed=11, temperature=1.0)
    b = client.completions.create(model="base", prompt=["x", "y"], max_tokens=8, n=3, seed=11, temperature=1.0)
    assert [c.index for c in a.choices] == list(range(6))
    assert [c.text for c in a.choices] == [c.text for c in b.choices]            # a seed replays
    assert len({c.text for c in a.choices[:3]}) > 1                               # choices differ
    chat = client.chat.completions.create(model="base", messages=HI, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)


def test_adapters_by_name_and_by_the_lora_field(world, client):
    def reply(model, lora=None):
        extra = {"lora": lora} if lora is not None else None
        return client.chat.completions.create(model=model, messages=HI, max_tokens=10, temperature=0,
                                              extra_body=extra).choices[0].message.content
    by_name = reply("a")
    assert by_name == reply("base", [{"name": "a", "weight": 1.0}]) == chat_ref(world, HI, 10, [("a", 1.0)])
    stacked = reply("a", [{"name": "b", "weight": 0.5}])
    assert stacked == chat_ref(world, HI, 10, [("a", 1.0), ("b", 0.5)])
    assert len({by_name, stacked, reply("base"), reply("base", [{"name": "a", "weight": 0}])}) == 3   # weight 0: off


# ---- bad requests ---------------------------------------------------------------------------------
def _post(url, path, body=None, raw=None, headers=None, key=KEY):
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    return httpx.post(url + path, content=raw if raw is not None else json.dumps(body), headers=h, timeout=30)


CHAT = "/v1/chat/completions"
GOOD = {"model": "base", "messages": HI, "max_tokens": 2}
BAD = [
    ("invalid JSON", CHAT, None, b'{"model": "base", ', 400, None),
    ("not an object", CHAT, [1, 2], None, 400, None),
    ("no messages", CHAT, {"model": "base"}, None, 400, "messages"),
    ("empty messages", CHAT, {"model": "base", "messages": []}, None, 400, "messages"),
    ("text temperature", CHAT, {**GOOD, "temperature": "hot"}, None, 400, "temperature"),
    ("float n", CHAT, {**GOOD, "n": 1.5}, None, 400, "n"),
    ("bool max_tokens", CHAT, {**GOOD, "max_tokens": True}, None, 400, "max_tokens"),
    ("temperature 3", CHAT, {**GOOD, "temperature": 3}, None, 400, "temperature"),
    ("top_p 0", CHAT, {**GOOD, "top_p": 0}, None, 400, "top_p"),
    ("max_tokens 0", CHAT, {**GOOD, "max_tokens": 0}, None, 400, "max_tokens"),
    ("n 100", CHAT, {**GOOD, "n": 100}, None, 400, "n"),
    ("top_logprobs 50", CHAT, {**GOOD, "logprobs": True, "top_logprobs": 50}, None, 400, "top_logprobs"),
    ("negative seed", CHAT, {**GOOD, "seed": -1}, None, 400, "seed"),
    ("huge top_k", CHAT, {**GOOD, "top_k": 1 << 70}, None, 400, "top_k"),
    ("huge adapter weight", CHAT, {**GOOD, "lora": [{"name": "a", "weight": 1e300}]}, None, 400, "lora.0.weight"),
    ("unknown field", CHAT, {**GOOD, "tempreature": 1}, None, 400, "tempreature"),
    ("tool role", CHAT, {**GOOD, "messages": [{"role": "tool", "content": "x"}]}, None, 400, "messages.0.role"),
    ("five stops", CHAT, {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
    ("penalty", CHAT, {**GOOD, "presence_penalty": 1.0}, None, 400, "presence_penalty"),
    ("context", CHAT, {**GOOD, "max_tokens": 100000}, None, 400, "max_tokens"),
    ("infinite weight", CHAT, None, b'{"model": "base", "messages": [], "lora": [{"name": "a", "weight": Infinity}]}',
     400, None),
    ("unknown model", CHAT, {**GOOD, "model": "nope"}, None, 404, "model"),
    ("a path as model", CHAT, {**GOOD, "model": "../base.tinygpt"}, None, 404, "model"),
    ("unknown adapter", CHAT, {**GOOD, "lora": [{"name": "zzz"}]}, None, 404, "lora"),
    ("a path as adapter", CHAT, {**GOOD, "lora": [{"name": "/tmp/a.lora"}]}, None, 404, "lora"),
    ("token ids out of range", "/v1/completions", {"model": "base", "prompt": [1, 99999]}, None, 400, "prompt"),
    ("echo + logprobs", "/v1/completions", {"model": "base", "prompt": "x", "echo": True, "logprobs": 1}, None,
     400, "echo"),
    ("no route", "/v1/nothing", GOOD, None, 404, None),
]


@pytest.mark.parametrize("what,path,body,raw,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(world, what, path, body, raw, status, param):
    r = _post(world["url"], path, body, raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "server_error")
    if param:
        assert err["param"] == param


def test_keys_sizes_methods_and_still_serving(world, client):
    url = world["url"]
    assert _post(url, CHAT, GOOD, key=None).status_code == 401
    r = _post(url, CHAT, GOOD, key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models").status_code == 401
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * 70000}]}
    assert _post(url, CHAT, big).status_code == 413

    def chunked():      # no Content-Length: the size is counted as the body arrives
        yield json.dumps(big).encode()
    r = httpx.post(url + CHAT, content=chunked(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(url + CHAT, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and "error" in r.json()
    assert _post(url, CHAT, GOOD, headers={"Content-Type": "text/plain"}).status_code in (200, 400)
    assert client.chat.completions.create(model="base", messages=HI, max_tokens=3).choices[0].message is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=HI, temperature=-1)


# ---- concurrency and disconnects --------------------------------------------------------------------
def test_200_concurrent_streams_none_lost_or_mixed(world):
    """200 streaming chats at once (32 slots: they queue, join and leave the running batch), with
    different budgets and adapter stacks; each stream's text equals that request served alone."""
    stacks = [("base", None, ()), ("a", None, (("a", 1.0),)), ("base", [{"name": "b", "weight": 0.7}], (("b", 0.7),))]
    reqs = [([{"role": "user", "content": f"question {i}"}], 1 + i % 6, stacks[i % 3]) for i in range(200)]

    async def one(c, messages, max_new, stack):
        model, lora, _ = stack
        s = await c.chat.completions.create(model=model, messages=messages, max_tokens=max_new, temperature=0,
                                            stream=True, extra_body={"lora": lora} if lora else None)
        parts, finish = [], None
        async for ch in s:
            parts.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        c = openai.AsyncOpenAI(base_url=world["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(c, *r) for r in reqs))
        finally:
            await c.close()
    t = time.time()
    got = asyncio.run(main())
    assert time.time() - t < 60
    for (messages, max_new, stack), (text, finish) in zip(reqs, got):
        assert finish in ("stop", "length")
        assert text == chat_ref(world, messages, max_new, stack[2])
    assert world["service"].scheduler.stats()["running"] == 0


def test_disconnect_frees_the_slot(world):
    stats = world["service"].scheduler.stats
    before = stats()["cancelled"]
    body = {"model": "base", "prompt": "x", "max_tokens": 500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", world["url"] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        next(r.iter_lines())                  # the first chunk arrived: the sequence is running
    try:                                      # a non-streamed request whose client gives up
        httpx.post(world["url"] + "/v1/completions", json={**body, "stream": False}, timeout=0.3,
                   headers={"Authorization": f"Bearer {KEY}"})
    except httpx.TimeoutException:
        pass
    deadline = time.time() + 20
    while (stats()["cancelled"] < before + 2 or stats()["running"]) and time.time() < deadline:
        time.sleep(0.02)
    assert stats()["cancelled"] == before + 2 and stats()["running"] == 0


def _serve(base, *flags):
    """`tinygpt serve base` on a free port, started and answering: (process, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tinygpt.cli", "serve", base, "--port", str(port), "--device", "cpu",
                             "--log-level", "warning", *flags], env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return proc, url


def _stream_through_a_sigterm(proc, url, base):
    """SIGTERM while a stream runs: the stream still ends with [DONE] after all its tokens, and
    the server exits cleanly."""
    body = {"model": "base", "prompt": "x", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}                  # every one of the 400 tokens, whatever they are
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = next(lines)
        proc.send_signal(signal.SIGTERM)
        rest = [x for x in [first, *lines] if x]
    events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
    assert rest[-1] == "data: [DONE]"
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == text_ref_of(base, "x", 400) and len(text) > 100
    assert proc.wait(30) in (0, -signal.SIGTERM)        # uvicorn exits by the signal it caught
    assert "Traceback" not in proc.stderr.read()


def test_shutdown_finishes_in_flight_streams(tmp_path):
    """The command line server: SIGTERM while a stream runs; the stream still ends with [DONE]
    after all its tokens, and the process exits cleanly."""
    base, _ = make_world(tmp_path, block_size=512)
    proc, url = _serve(base)
    try:
        _stream_through_a_sigterm(proc, url, base)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_http_workers_serve_together_and_stop_together(tmp_path):
    """--http-workers 2: two HTTP processes on one socket and one engine process; concurrent
    requests through both give what each gives alone, and a SIGTERM to the first process still
    finishes the open stream and ends every process."""
    base, _ = make_world(tmp_path, block_size=512)
    proc, url = _serve(base, "--http-workers", "2")
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    try:
        assert len(kids) == 3                               # the engine, the second HTTP process, mp's tracker
        prompts = [f"p{i % 3}" for i in range(24)]
        alone = {p: text_ref_of(base, p, 12) for p in set(prompts)}

        def one(p):
            body = {"model": "base", "prompt": p, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        with ThreadPoolExecutor(12) as pool:
            assert list(pool.map(one, prompts)) == [alone[p] for p in prompts]
        _stream_through_a_sigterm(proc, url, base)
        deadline = time.time() + 30
        while any(Path(f"/proc/{k}").exists() and Path(f"/proc/{k}/stat").read_text().split()[2] != "Z"
                  for k in kids) and time.time() < deadline:
            time.sleep(0.1)
        assert time.time() < deadline, "a child process outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_past_its_share_of_the_queue_a_server_process_answers_429(tmp_path):
    """An engine process with one slot and a queue of one: two streams in flight fill this server
    process's share, a third request is a 429 at once (the engine is never sent more than it can
    queue), and once they ended the next request is served."""
    base, _ = make_world(tmp_path, block_size=512)
    opts = ServeOptions(model=base, device="cpu", max_batch=1, max_queue=1)
    assert pipe_capacity(opts) == 2 and pipe_capacity(ServeOptions(model=base, max_batch=4, max_queue=10,
                                                                    http_workers=3)) == 5
    server = Server(create_app(build_service(opts, engine_process=True)))
    body = {"model": "base", "prompt": "x", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    started, ends = threading.Event(), []

    def stream():
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            started.set()
            ends.append([x for x in lines if x][-1])
    try:
        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        assert started.wait(30)
        time.sleep(0.05)                    # the second request is in by now (queued behind the first)
        third = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert third.status_code == 429, third.text
        for t in threads:
            t.join(60)
        assert ends == ["data: [DONE]"] * 2
        after = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert after.status_code == 200
    finally:
        server.stop()


def text_ref_of(base, prompt, max_new):
    """The greedy text of max_new tokens after `prompt`, end-of-text tokens included."""
    model, tok = load_model_and_tokenizer(base)
    g = generate(model, [tok.encode(prompt)], max_new, temperature=0, vocab_limit=tok.vocab_size)
    return tok.decode([int(t) for t in g.tokens[0]])


def test_the_engine_process_reports_load_errors_and_its_death(tmp_path):
    """A model the engine process cannot load is the same one-line error as in one process; an
    engine process that dies ends the open streams with an error event and [DONE], and the
    server then answers 503 instead of hanging."""
    from tinygpt.errors import UserError
    bad = tmp_path / "bad.tinygpt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(UserError) as one:
        build_service(ServeOptions(model=str(bad), device="cpu"))
    with pytest.raises(UserError) as other:
        build_service(ServeOptions(model=str(bad), device="cpu"), engine_process=True)
    assert str(other.value) == str(one.value)
    base, _ = make_world(tmp_path, block_size=512)
    service = build_service(ServeOptions(model=base, device="cpu"), engine_process=True)
    server = Server(create_app(service))
    try:
        body = {"model": "base", "prompt": "x", "max_tokens": 400, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            service.scheduler.proc.kill()
            rest = [x for x in [first, *lines] if x]
        assert rest[-1] == "data: [DONE]" and any('"server_error"' in x for x in rest)
        again = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=10)
        assert again.status_code == 503 and again.json()["error"]["type"] == "server_error"
    finally:
        server.stop()


# ---- the web page -----------------------------------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_chat_page_in_headless_chromium(world, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            page.goto(world["url"] + "/")
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelectorAll('#adapters input').length == 2")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#system", "be brief")
            page.fill("#message", "hello page")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30000)
            first = page.inner_text(".msg.assistant .text")
            page.fill("#message", "and again")                  # a second turn sends the history
            page.click("#send")
            page.wait_for_selector(".msg.assistant:nth-of-type(4)[data-state=done]", timeout=30000)
            second = page.locator(".msg.assistant .text").nth(1).inner_text()
            page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
        finally:
            browser.close()
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello page"}]
    assert first == chat_ref(world, turn1, 12)
    turn2 = turn1 + [{"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
    assert second == chat_ref(world, turn2, 12)
    assert (tmp_path / "chat.png").stat().st_size > 1000
