"""``relaykern serve``: the OpenAI-compatible HTTP server over an engine stepped by its own thread."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine.background import BackgroundEngine, EngineDead
from relaykern.reference import reference_generate
from relaykern.scripted import force_command
from relaykern.server import RelayServer

CALL_AT, CALL_N = 2, 3


@pytest.fixture(scope="module")
def server(slm_dir, llm_dir, tokenizer):
    """A server on a free port whose SLM writes ``<call>3</call>`` from response token 2 in every request."""
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"),
                         llm_config=EngineConfig(device="cpu"))
    with BackgroundEngine(engine) as background:
        httpd = RelayServer(background, ("127.0.0.1", 0), model_name="tiny-relay",
                            logits_processors=[force_command(tokenizer, CALL_AT, CALL_N)])
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield httpd
        httpd.shutdown()
        httpd.server_close()


def post(server, path: str, body, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}{path}", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}{path}", timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def without_latencies(relay: dict) -> dict:
    return {**relay, "call_records": [{**r, "latency_s": None} for r in relay["call_records"]]}


def stream_events(server, path: str, body) -> list:
    """The stream's events, parsed, and ``"[DONE]"`` last."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}{path}",
                                     data=json.dumps({**body, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        lines = [line for line in response.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_batch_relays_as_the_reference_does_and_concurrent_requests_share_the_engine(
        server, slm_model, llm_model, tokenizer):
    """Two prompts in one request and a third from another thread at once: greedy tokens, spans, finish reasons and
    call statistics equal the reference relay's; usage counts the tokens."""
    prompts = ["What is 3 + 4?", "Name a prime."]
    body = {"model": "tiny-relay", "prompt": prompts, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    other: dict = {}
    thread = threading.Thread(target=lambda: other.update(zip(("status", "body"), post(
        server, "/v1/completions", {**body, "prompt": "Another one", "max_tokens": 11}))))
    thread.start()
    status, reply = post(server, "/v1/completions", body)
    thread.join()
    sampling = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                              logits_processors=[force_command(tokenizer, CALL_AT, CALL_N)])
    expected = reference_generate([text_tokens(tokenizer, p) for p in prompts + ["Another one"]],
                                  slm_model, llm_model, tokenizer, sampling, None, RelayConfig())
    expected[2] = reference_generate([expected[2].prompt_token_ids], slm_model, llm_model, tokenizer,
                                     SamplingParams(**{**sampling.__dict__, "max_tokens": 11}), None, RelayConfig())[0]
    assert status == 200 and other["status"] == 200
    assert reply["object"] == "text_completion" and reply["model"] == "tiny-relay"
    choices = reply["choices"] + other["body"]["choices"]
    for choice, want in zip(choices, expected):
        assert choice["token_ids"] == want.token_ids and choice["text"] == want.text
        assert [tuple(span) for span in choice["relay"]["spans"]] == want.spans
        assert choice["finish_reason"] == want.finish_reason == "length"
        assert (choice["relay"]["calls"], choice["relay"]["llm_tokens"]) == (1, want.stats.llm_tokens)
        assert choice["relay"]["call_ratio"] == pytest.approx(want.stats.call_ratio)
    assert [c["relay"]["llm_tokens"] for c in choices] == [CALL_N, CALL_N, 2]  # (the third: 11 tokens at most)
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["usage"] == {"prompt_tokens": sum(len(w.prompt_token_ids) for w in expected[:2]),
                              "completion_tokens": 24, "total_tokens": 24 + sum(len(w.prompt_token_ids)
                                                                                for w in expected[:2])}


def test_n_choices_per_prompt_come_in_openai_order_each_drawn_with_its_own_seed(server):
    """``n`` choices of each prompt at ``i * n + j``; choice j draws with seed + j, so they differ and a request
    asking for that seed alone writes choice j again; usage counts each prompt once."""
    body = {"prompt": ["Roll a die", "Flip a coin"], "n": 3, "temperature": 1.0, "seed": 5, "max_tokens": 8}
    status, reply = post(server, "/v1/completions", body)
    assert status == 200 and [c["index"] for c in reply["choices"]] == list(range(6))
    ids = [c["token_ids"] for c in reply["choices"]]
    assert len({tuple(i) for i in ids[:3]}) == 3
    assert post(server, "/v1/completions", body)[1]["choices"] == reply["choices"]
    first = post(server, "/v1/completions", {**body, "prompt": "Roll a die", "n": 1})[1]
    fifth = post(server, "/v1/completions", {**body, "prompt": "Flip a coin", "n": 1, "seed": 6})[1]
    assert first["choices"][0]["token_ids"] == ids[0] and fifth["choices"][0]["token_ids"] == ids[4]
    assert reply["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + fifth["usage"]["prompt_tokens"]
    assert reply["usage"]["completion_tokens"] == sum(len(i) for i in ids)


def test_a_stream_of_several_choices_names_each_chunk_s_choice(server):
    body = {"prompt": ["One", "Two"], "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 12}
    plain = post(server, "/v1/completions", body)[1]["choices"]
    events = stream_events(server, "/v1/completions", body)[:-1]
    for choice in plain:
        chunks = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in chunks) == choice["text"]
        assert sum((c.get("token_ids", []) for c in chunks), []) == choice["token_ids"]
        assert [c["finish_reason"] for c in chunks][-1] == "length"


def test_a_chat_stream_gives_the_tokens_of_the_plain_reply_with_the_model_that_wrote_them(server):
    """Streamed chunks join to the non-streamed reply's text and ids; each names its model (the LLM's 3 tokens are
    ``llm``); the first delta names the role, the last carries the finish reason and the relay's account, then
    the usage chunk and ``[DONE]``."""
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}], "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "logprobs": True, "chat_template_kwargs": {"enable_thinking": False}}
    status, plain = post(server, "/v1/chat/completions", body)
    events = stream_events(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert status == 200 and plain["object"] == "chat.completion"
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    chunks = [e["choices"][0] for e in events[:-2]]
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-2])
    assert chunks[0]["delta"]["role"] == "assistant" and "role" not in chunks[1]["delta"]
    choice = plain["choices"][0]
    assert "".join(c["delta"]["content"] for c in chunks) == choice["message"]["content"]
    assert sum((c.get("token_ids", []) for c in chunks), []) == choice["token_ids"]
    sources = sum(([c["source"]] * len(c["token_ids"]) for c in chunks[:-1]), [])
    assert sources == [source for source, start, end in choice["relay"]["spans"] for _ in range(start, end)]
    assert sources.count("llm") == CALL_N
    assert chunks[-1]["finish_reason"] == choice["finish_reason"] == "length"
    assert without_latencies(chunks[-1]["relay"]) == without_latencies(choice["relay"])
    logprobs = [entry["logprob"] for c in chunks[:-1] for entry in c["logprobs"]["content"]]
    assert logprobs == [entry["logprob"] for entry in choice["logprobs"]["content"]]
    assert len(logprobs) == 12 and logprobs[CALL_AT] == 0.0  # (a forced token)


@pytest.mark.parametrize("path, body, message", [
    ("/v1/completions", {"prompt": "x", "n": 0}, "n must be an int >= 1"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 3}, "best_of must be 2"),
    ("/v1/completions", {"prompt": "x", "include_stop_str_in_output": False}, "the stop string in the text"),
    ("/v1/completions", {"prompt": "x", "tempreature": 0}, "unsupported field(s): tempreature"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature must be finite and >= 0"),
    ("/v1/completions", {"prompt": [10**9]}, "out of range"),
    ("/v1/completions", {"prompt": []}, "prompt must be"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, "logprobs must be 0"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, "exceeds the model context"),
    ("/v1/completions", {"prompt": "x", "llm_sampling": {"top_q": 1}}, "llm_sampling: unsupported field(s): top_q"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, "stop"),
    ("/v1/chat/completions", {"messages": []}, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/completions", None, "not valid JSON"),
    ("/v1/completions", [1, 2], "must be a JSON object"),
])
def test_a_bad_request_gets_400_naming_the_problem_and_the_server_goes_on(server, path, body, message):
    status, reply = post(server, path, body, raw=b"{nope" if body is None else None)
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    assert message in reply["error"]["message"]
    assert post(server, "/v1/completions", {"prompt": "ok", "max_tokens": 2})[0] == 200


def test_a_bug_serving_one_request_is_a_500_naming_it(server, monkeypatch):
    from relaykern.server import app

    def broken(*args):
        raise KeyError("oops")

    monkeypatch.setattr(app, "parse_request", broken)
    status, reply = post(server, "/v1/completions", {"prompt": "x"})
    assert status == 500 and reply["error"]["message"] == "KeyError: 'oops'"


def test_with_an_api_key_the_v1_routes_answer_only_requests_that_carry_it(server, monkeypatch):
    monkeypatch.setattr(server, "api_key", "s3cret")
    assert post(server, "/v1/completions", {"prompt": "x"})[0] == 401
    status, reply = post(server, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert status == 401 and "API key" in reply["error"]["message"]
    assert get(server, "/v1/models")[0] == 401 and get(server, "/health")[0] == 200
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 2},
                headers={"Authorization": "Bearer s3cret"})[0] == 200


def test_routes_health_and_models(server):
    assert get(server, "/health") == (200, {"status": "ok"})
    assert get(server, "/v1/models")[1]["data"][0]["id"] == "tiny-relay"
    assert get(server, "/v2/nothing")[0] == 404
    assert post(server, "/v1/embeddings", {})[0] == 404


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_aborts_its_request(server, monkeypatch, stream):
    """The server notices at its next write, or (waiting for a whole reply) within half a second; the request is
    aborted and its KV blocks freed."""
    background, submitted = server.background, []

    def submit(*args, **kwargs):
        submitted.append(BackgroundEngine.submit(background, *args, **kwargs))
        return submitted[-1]

    def slow_step(step=background.engine.step):  # (400 tokens take 4 s at least: the client leaves before)
        time.sleep(0.01)
        step()

    monkeypatch.setattr(background, "submit", submit)
    monkeypatch.setattr(background.engine, "step", slow_step)
    body = json.dumps({"prompt": "Count", "max_tokens": 400, "ignore_eos": True, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=60) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            assert client.recv(64).startswith(b"HTTP/1.0 200")
        else:
            while not submitted:
                time.sleep(0.01)
    deadline = time.monotonic() + 60
    while background.live and time.monotonic() < deadline:
        time.sleep(0.05)
    (seq,) = submitted[0].seqs  # (its events went to the handler, which left)
    assert seq.finish_reason == "abort" and len(seq.response) < 400
    assert_no_blocks_held(background.engine)


def test_a_failing_engine_fails_its_requests_and_refuses_new_ones(slm_dir):
    """A forward that raises ends every request in flight with the error; later submissions raise EngineDead, and
    the server says 503."""
    engine = RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu"))
    steps = 0
    step = engine.step

    def failing_step():
        nonlocal steps
        steps += 1
        if steps == 3:
            raise RuntimeError("device lost")
        step()

    engine.step = failing_step
    with BackgroundEngine(engine) as background:
        outputs = background.submit([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=50, ignore_eos=True)).results()
        assert [o.finish_reason for o in outputs] == ["error", "error"]
        assert all("RuntimeError: device lost" in o.error for o in outputs)
        with pytest.raises(EngineDead, match="device lost"):
            background.submit([[1, 2]])
        httpd = RelayServer(background, ("127.0.0.1", 0))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            assert get(httpd, "/health")[0] == 503
            status, reply = post(httpd, "/v1/completions", {"prompt": "x"})
            assert status == 503 and "device lost" in reply["error"]["message"]
        finally:
            httpd.shutdown()
            httpd.server_close()


def test_closing_aborts_what_is_in_flight(slm_dir):
    engine = RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu"))
    background = BackgroundEngine(engine)
    submission = background.submit([[1, 2, 3]], SamplingParams(max_tokens=1000, ignore_eos=True))
    background.close()
    (output,) = submission.results()
    assert output.finish_reason == "abort" and background.failure == "closed"
    with pytest.raises(EngineDead):
        background.submit([[1]])
    assert_no_blocks_held(engine)


def test_cli_serve_answers_as_the_model_it_names_until_stopped(slm_dir, llm_dir, monkeypatch, capsys):
    """``relaykern serve``: the scripted command of ``--force-call-at`` relays; stopped (Ctrl-C), it closes the
    engine thread."""
    from relaykern.cli import main as cli_main
    from relaykern.server import app

    replies, served = [], app.RelayServer.serve_forever

    def serve_one_request(httpd):
        thread = threading.Thread(target=served, args=(httpd,))
        thread.start()
        replies.append(post(httpd, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 12},
                            headers={"Authorization": "Bearer k"}))
        httpd.shutdown()
        thread.join()
        raise KeyboardInterrupt

    monkeypatch.setattr(app.RelayServer, "serve_forever", serve_one_request)
    assert cli_main(["serve", "--slm", str(slm_dir), "--llm", str(llm_dir), "--device", "cpu", "--port", "0",
                     "--served-model-name", "m", "--force-call-at", "2", "--force-call-n", "3", "--api-key", "k"]) == 0
    (status, reply), = replies
    assert status == 200 and reply["model"] == "m" and reply["choices"][0]["relay"]["llm_tokens"] == 3
    assert "serving m on http://127.0.0.1:" in capsys.readouterr().out


def test_queued_deltas_come_merged_per_prompt_and_model_in_order():
    """A reader slower than the engine gets what queued up as fewer, larger deltas: each prompt's consecutive
    tokens from one model joined, each prompt's order kept."""
    from relaykern.engine.background import Delta, Done, Submission

    submission = Submission(None, size=2, stream=True)
    outputs = [object(), object()]
    for event in [Delta(0, "slm", [1], [-0.1]), Delta(1, "slm", [5], [-0.5]), Delta(0, "slm", [2], [-0.2]),
                  Delta(0, "llm", [3], [-0.3]), Delta(0, "llm", [4], [-0.4]), Done(1, outputs[1]),
                  Done(0, outputs[0])]:
        submission.queue.put(event)
    assert list(submission.events()) == [Delta(0, "slm", [1, 2], [-0.1, -0.2]), Delta(1, "slm", [5], [-0.5]),
                                         Delta(0, "llm", [3, 4], [-0.3, -0.4]), Done(1, outputs[1]),
                                         Done(0, outputs[0])]


def test_a_reader_waiting_longer_than_a_heartbeat_beats_and_gets_every_event(slm_dir, monkeypatch):
    engine = RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu"))
    sampling = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    alone = engine.generate([[1, 2, 3]], sampling)

    def slow_step(step=engine.step):  # (longer than a heartbeat: the reader's wait times out between events)
        time.sleep(0.03)
        step()

    monkeypatch.setattr(engine, "step", slow_step)
    beats = []
    with BackgroundEngine(engine) as background:
        events = list(background.submit([[1, 2, 3]], sampling).events(lambda: beats.append(1), every_s=0.01))
    assert len(beats) >= 5 and sum((e.token_ids for e in events[:-1]), []) == alone[0].token_ids
    assert events[-1].output.token_ids == alone[0].token_ids


def test_a_submission_that_does_not_stream_gets_its_outputs_only(slm_dir):
    engine = RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu"))
    sampling = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = engine.generate([[1, 2, 3], [4, 5]], sampling)
    with BackgroundEngine(engine) as background:
        for stream in (False, True):
            events = list(background.submit([[1, 2, 3], [4, 5]], sampling, stream=stream).events())
            deltas = [e for e in events if not hasattr(e, "output")]
            assert (len(deltas) > 0) == stream
            assert sorted((e.index, e.output.token_ids) for e in events if hasattr(e, "output")) == \
                [(i, out.token_ids) for i, out in enumerate(alone)]
