"""``relaykern serve``: an OpenAI-compatible HTTP server (``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /health``) over one engine stepped by its own thread, so concurrent requests share its
batches. Streams are server-sent events (``"stream": true``), ended by ``data: [DONE]``; a client that leaves
aborts its requests (a waiting handler looks every half second). Built on the standard library's threading HTTP
server: a thread per connection, which only waits on its requests' tokens.
"""
from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import select
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Sequence

from relaykern.config import LogitsProcessor
from relaykern.engine.background import BackgroundEngine, Delta, EngineDead, Submission
from relaykern.server.schema import (Reply, Request, delta_choice, logprobs_body, parse_request, relay_info,
                                     usage)
from relaykern.tokenizer import TextStream

log = logging.getLogger("relaykern")

ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}
"""POST paths, and whether each is the chat API."""
MAX_BODY_BYTES = 64 << 20


class RelayServer(ThreadingHTTPServer):
    """Serves ``background``'s engine at ``address`` (port 0: any free port, see ``server_port``) as ``model_name``.
    ``default_max_tokens`` is a chat request's ``max_tokens`` when it gives none; ``logits_processors`` are applied
    to every request's SLM (the demo's scripted commands). With an ``api_key``, the ``/v1`` routes answer only
    requests that carry it (``Authorization: Bearer <key>``, as OpenAI's clients send it); ``/health`` stays open."""

    daemon_threads = True

    def __init__(self, background: BackgroundEngine, address: tuple[str, int] = ("127.0.0.1", 8000),
                 model_name: str = "relaykern", default_max_tokens: int = 1024,
                 logits_processors: Sequence[LogitsProcessor] = (), api_key: str | None = None) -> None:
        super().__init__(address, Handler)
        self.background = background
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.logits_processors = tuple(logits_processors)
        self.api_key = api_key


class Handler(BaseHTTPRequestHandler):
    server: RelayServer

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/health":
            background = self.server.background
            if background.alive:
                return self._send_json(200, {"status": "ok"})
            return self._send_error(503, f"the engine is not running: {background.failure}", "engine_dead")
        if not self._authorized():
            return None
        if path == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "relaykern"}]})
        self._send_error(404, f"no route GET {path}", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        if not self._authorized():
            return None
        if path not in ROUTES:
            return self._send_error(404, f"no route POST {path}", "not_found")
        try:
            request = parse_request(self._read_json(), ROUTES[path], self.server.background.engine.tokenizer
                                    .apply_chat_template, self.server.default_max_tokens)
            extra = self.server.logits_processors
            samplings = [dataclasses.replace(s, logits_processors=[*s.logits_processors, *extra])
                         for s in request.samplings] if extra else request.samplings
            submission = self.server.background.submit(request.prompts, samplings, request.llm_sampling,
                                                       stream=request.stream)
        except EngineDead as err:
            return self._send_error(503, str(err), "engine_dead")
        except ValueError as err:  # bad JSON, a field relaykern cannot serve, a prompt too long, ...
            return self._send_error(400, str(err), "invalid_request_error")
        except Exception as err:  # noqa: BLE001 - a bug in serving one request must not cost the client its answer
            log.exception("relaykern: a request failed")
            return self._send_error(500, f"{type(err).__name__}: {err}", "internal_error")
        reply = Reply(request.chat, self.server.model_name)
        try:
            if request.stream:
                self._stream(reply, request, submission)
            else:
                self._respond(reply, request, submission)
        except (BrokenPipeError, ConnectionResetError):  # the client left: its requests need not run on
            submission.cancel()

    def _client_still_there(self) -> None:
        """Raises ConnectionResetError once the client has closed its side (its socket reads as ended)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if readable and not self.connection.recv(1, socket.MSG_PEEK):
            raise ConnectionResetError("the client closed the connection")

    def _respond(self, reply: Reply, request: Request, submission: Submission) -> None:
        outputs = submission.results(heartbeat=self._client_still_there)
        token_bytes = self.server.background.engine.token_bytes
        choices = [reply.choice(i, out.text, out.finish_reason,
                                logprobs_body(reply.chat, token_bytes, out.token_ids, out.logprobs),
                                token_ids=out.token_ids, relay=relay_info(out)) for i, out in enumerate(outputs)]
        self._send_json(200, reply.body(choices, usage=usage(outputs, request.n)))

    def _stream(self, reply: Reply, request: Request, submission: Submission) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        engine = self.server.background.engine
        texts = [TextStream(engine.tokenizer) for _ in request.prompts]
        started: set[int] = set()
        outputs = [None] * len(request.prompts)
        for event in submission.events(heartbeat=self._client_still_there):
            first = event.index not in started
            started.add(event.index)
            if isinstance(event, Delta):
                text = texts[event.index].push(event.token_ids)
                choice = delta_choice(reply, event, text, first, engine.token_bytes)
            else:
                outputs[event.index] = event.output
                choice = reply.choice(event.index, texts[event.index].flush(), event.output.finish_reason, None,
                                      delta=True, first=first, relay=relay_info(event.output))
            self._send_event(reply.body([choice], chunk=True))
        if request.include_usage:
            self._send_event(reply.body([], chunk=True, usage=usage(outputs, request.n)))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    # ------------------------------------------------------------------ plumbing
    def _authorized(self) -> bool:
        """True, or (a key is set and the request does not carry it) False with a 401 sent."""
        key = self.server.api_key
        if key is None or hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
            return True
        self._send_error(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error")
        return False

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ValueError("the request needs a Content-Length header") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise ValueError(f"the request body must be at most {MAX_BODY_BYTES} bytes, got {length}")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"the request body is not valid JSON: {err}") from None

    def _send_event(self, body: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, status: int, message: str, kind: str) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.info("%s - %s", self.address_string(), format % args)


def serve(background: BackgroundEngine, host: str = "127.0.0.1", port: int = 8000, **server_options: Any) -> None:
    """Serves until interrupted (Ctrl-C), then closes the engine thread (aborting the requests in flight)."""
    server = RelayServer(background, (host, port), **server_options)
    print(f"relaykern: serving {server.model_name} on http://{host}:{server.server_port}/v1 (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        background.close()
