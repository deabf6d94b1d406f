"""The OpenAI-compatible server, spoken to by the official `openai` client over 127.0.0.1.

Every request loop is bounded in count and in time (client timeouts, deadlines), and every server
started here is stopped by its pid (`ServerProcess`).
"""

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import httpx
import openai
import pytest

from moe import MoETransformer, load_config
from moe.checkpoint import save_checkpoint
from moe.serve.api import Detokenizer
from moe.serve.process import ServerProcess
from moe.tokenizer import train_tokenizer

CONTEXT = 1024  # long enough that a request is still running when its client leaves
LONG = {"ignore_eos": True}  # vLLM's extension: exactly max_tokens tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny model, untrained, with a context of 1024 tokens: greedy answers test as well as any."""
    cfg = load_config("tiny")
    cfg = replace(cfg, model=replace(cfg.model, max_seq_len=CONTEXT))
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, cfg.model.vocab_size)
    run = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(run, 0, MoETransformer(cfg.model).eval(), {}, cfg, tokenizer, keep=1)
    return run


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerProcess(["--checkpoint", str(checkpoint), "--slots", "8", "--step-tokens", "24"]) as server:
        yield server


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def finished(server, how: str) -> float:
    """moe_requests_total{finish=how}: requests that ended so."""
    for line in server.get("/metrics").splitlines():
        if line.startswith(f'moe_requests_total{{finish="{how}"}}'):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_server_names_its_model_and_reports_health_and_metrics(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]
    assert '"status":"ok"' in server.get("/health")
    metrics = server.get("/metrics")
    for name in ("moe_queue_depth", "moe_running_requests", "moe_batch_size", "moe_generation_tokens_per_second",
                 "moe_time_to_first_token_seconds", "moe_inter_token_latency_seconds", "moe_expert_tokens"):
        assert f"# TYPE {name}" in metrics


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_and_whole_responses_agree(server, chat):
    c = client(server)
    if chat:
        create = c.chat.completions.create
        ask = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "add a and b"}]}
        whole_text, piece = (lambda r: r.choices[0].message.content), (lambda k: k.choices[0].delta.content or "")
    else:
        create, ask = c.completions.create, {"prompt": "def add(a, b):"}
        whole_text, piece = (lambda r: r.choices[0].text), (lambda k: k.choices[0].text)
    whole = create(model="tiny", max_tokens=20, temperature=0, extra_body=LONG, **ask)
    assert whole.usage.completion_tokens == 20 and whole.choices[0].finish_reason == "length"
    chunks = list(create(model="tiny", max_tokens=20, temperature=0, extra_body=LONG, stream=True,
                         stream_options={"include_usage": True}, **ask))
    assert "".join(piece(k) for k in chunks if k.choices) == whole_text(whole)
    assert [k.choices[0].finish_reason for k in chunks if k.choices][-1] == "length"
    assert chunks[-1].usage == whole.usage  # the last chunk carries the usage, as OpenAI's do


def test_32_concurrent_requests_each_get_what_they_get_alone(server):
    """Greedy: batched with up to 7 others, with prompts prefilled 24 tokens a step beside the
    decoding rows, every answer is the one the request gets served alone."""
    c = client(server)
    asks = [{"prompt": [(7 * i + j) % 500 + 5 for j in range(3 + 2 * i)], "max_tokens": 4 + i % 9 * 5}
            for i in range(32)]  # prompts of 3..65 tokens: up to 3 chunks each

    def ask(a):
        r = c.completions.create(model="tiny", temperature=0, extra_body=LONG, **a)
        return r.choices[0].text, r.usage.completion_tokens

    alone = [ask(a) for a in asks]
    before = {name: server.metric(name) for name in ("moe_batch_size_count", "moe_batch_size_sum")}
    routed_before = routed(server, layer=1)
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, asks, timeout=120))
    assert together == alone
    assert [n for _, n in alone] == [a["max_tokens"] for a in asks]
    steps, rows = (server.metric(name) - before[name] for name in before)
    assert rows / steps > 3  # they really were decoded together (8 slots)
    assert routed(server, layer=1) - routed_before == 2 * rows  # every decoded token went to top-2 experts


def test_a_server_with_compiled_decode_steps_answers_as_the_eager_one(server, checkpoint):
    asks = [{"prompt": [(5 * i + j) % 500 + 5 for j in range(2 + 3 * i)], "max_tokens": 3 + 4 * i} for i in range(6)]

    def answers(s) -> list[str]:
        c = client(s)
        with ThreadPoolExecutor(len(asks)) as pool:  # decoded together: batches of 1 to 6 rows
            return list(pool.map(lambda a: c.completions.create(model="tiny", temperature=0, extra_body=LONG,
                                                                **a).choices[0].text, asks, timeout=120))

    with ServerProcess(["--checkpoint", str(checkpoint), "--slots", "8", "--compile"], start_timeout_s=300) as compiled:
        assert "decode steps of up to 8 rows compiled in" in compiled.log()
        assert answers(compiled) == answers(server)


def routed(server, layer: int) -> float:
    """moe_expert_tokens_total summed over one layer's experts."""
    lines = server.get("/metrics").splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith("moe_expert_tokens_total{")
               and f'layer="{layer}"' in line)


def test_a_stop_string_ends_the_text_before_it(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="def", max_tokens=30, temperature=0, extra_body=LONG)
    text = full.choices[0].text
    assert len(text) >= 4
    stop = text[len(text) // 2:][:2]
    cut = c.completions.create(model="tiny", prompt="def", max_tokens=30, temperature=0, stop=[stop, "\x00"],
                               extra_body=LONG)
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny", prompt="def", max_tokens=30, temperature=0, stop=stop,
                                    stream=True, extra_body=LONG)
    assert "".join(k.choices[0].text for k in streamed) == cut.choices[0].text


def test_the_text_never_shows_a_stop_strings_beginning():
    tokenizer = train_tokenizer(["abcdef"] * 10, 300)
    ids = [tokenizer.token_to_id(ch) for ch in "xyzab"]
    text = Detokenizer(tokenizer, ["abc"])
    assert [text.add(i) for i in ids] == ["x", "y", "z", "", ""]  # "a", "ab" might begin "abc"
    assert text.finish() == "ab" and not text.done  # it did not: at the end, all of it


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    cancelled = finished(server, "cancelled")
    with httpx.Client(timeout=30) as http, http.stream(
            "POST", f"{server.url}/v1/completions",
            json={"model": "tiny", "prompt": "x", "max_tokens": CONTEXT - 10, "stream": True, **LONG}) as response:
        events = (line for line in response.iter_lines() if line)
        assert all(next(events).startswith("data: {") for _ in range(3))  # tokens are flowing; now leave
    assert wait_for(lambda: finished(server, "cancelled") == cancelled + 1)
    assert wait_for(lambda: server.metric("moe_running_requests") == 0)


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ({"temperature": -0.5}, "temperature: Input should be greater than or equal to 0"),
    ({"model": "gpt-4"}, "the model 'gpt-4' does not exist here"),
    ({"n": 2}, "n=2 is not supported"),
    ({"prompt": [5] * CONTEXT}, f"the prompt has {CONTEXT} tokens and the model's context is {CONTEXT}"),
    ({"prompt": [9999]}, "token id 9999 is outside the vocabulary"),
])
def test_bad_requests_are_answered_400_in_openais_shape(server, body, message):
    with pytest.raises(openai.BadRequestError) as error:
        client(server).completions.create(**({"model": "tiny", "prompt": "hi", "max_tokens": 4} | body))
    assert message in error.value.body["message"] and error.value.body["type"] == "invalid_request_error"


def test_malformed_json_is_a_400_and_the_server_serves_on(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    ok = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3)
    assert ok.usage.completion_tokens >= 1


def test_a_full_queue_answers_429_and_sigterm_drains_what_is_in_flight(checkpoint):
    with ServerProcess(["--checkpoint", str(checkpoint), "--slots", "1", "--max-queue", "1"]) as server:
        c = client(server)
        long = {"model": "tiny", "prompt": "x", "max_tokens": 600, "stream": True, "extra_body": LONG}
        running = c.completions.create(**long)  # holds the one slot
        waiting = c.completions.create(**long)  # waits for it: the queue is full
        with pytest.raises(openai.RateLimitError) as error:
            c.completions.create(model="tiny", prompt="x", max_tokens=4)
        assert int(error.value.response.headers["Retry-After"]) >= 1
        assert error.value.body["code"] == "rate_limit_exceeded"
        assert server.metric("moe_queue_depth") == 1
        waiting.close()  # leaves while queued

        chunks = [next(running)]
        server.terminate()  # in flight: `running` must still get all its 600 tokens
        assert wait_for(lambda: not _accepts(server))  # while no longer accepting connections
        chunks += list(running)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert server.wait(timeout_s=30) == -signal.SIGTERM  # uvicorn exits by the signal, once drained
        assert "Waiting for connections to close" in server.log() and "Finished server process" in server.log()


def _accepts(server) -> bool:
    try:
        httpx.get(f"{server.url}/health", timeout=5)
        return True
    except httpx.TransportError:
        return False
