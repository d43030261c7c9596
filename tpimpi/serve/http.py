"""Rank 0's HTTP front: aiohttp in a thread of its own, handing sequences to the batcher and streaming
their events back (server-sent events or one JSON answer)."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from importlib import resources

from aiohttp import web

from ..errors import UsageError
from ..sampling import SamplingConfig
from . import api
from .batcher import Batcher, QueueFull, Sequence, ShuttingDown

RETRY_AFTER_S = 2
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error(e: api.ApiError) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=e.headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class HttpFront:
    """The routes, and the event loop thread that serves them."""

    def __init__(self, batcher: Batcher, tok, limits: api.Limits, api_key: str | None, max_body: int):
        self.batcher, self.tok, self.limits, self.api_key, self.max_body = batcher, tok, limits, api_key, max_body
        self.page = resources.files(__package__).joinpath("static/index.html").read_bytes()
        self.created = api.now()
        self.loop = self.thread = self.runner = None
        self.address = ("", 0)
        self.open = 0  # requests taken by the batcher whose answer has not ended yet (the loop thread counts)
        self._posted: list[tuple[asyncio.Queue, tuple]] = []  # events from the decode thread not yet queued
        self._post_lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body)
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # ---- lifecycle ------------------------------------------------------------------------------------
    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on host:port (0: any free port) in a thread; returns the bound address once listening."""
        self.loop = asyncio.new_event_loop()
        bound, failure = threading.Event(), []

        def run():
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
            try:
                self.loop.run_until_complete(self.runner.setup())
                site = web.TCPSite(self.runner, host, port, reuse_address=True)
                self.loop.run_until_complete(site.start())
                self.address = site._server.sockets[0].getsockname()[:2]
            except OSError as e:
                failure.append(e)
                bound.set()
                return
            bound.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="tpimpi-http", daemon=True)
        self.thread.start()
        bound.wait()
        if failure:
            raise UsageError(f"cannot listen on {host}:{port}: {failure[0].strerror or failure[0]}")
        return self.address

    def stop(self, timeout: float = 5.0) -> None:
        """Let open responses end, close the listener and the loop."""
        if self.loop is None or not self.thread.is_alive():
            return
        done = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        try:
            done.result(timeout)
        except Exception:  # noqa: BLE001 (closing down: a response that cannot finish is dropped)
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)

    def wait_answered(self, timeout: float) -> None:
        """Wait (at most timeout) until every request taken has had its answer written to the end."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            time.sleep(0.005)

    def _post(self, events: asyncio.Queue, event: tuple) -> None:
        """Hand an event to a response (from the decode thread). The events of one step wake the loop once,
        not once per token: each wake-up is a write to the loop's pipe and a turn of the loop that takes the
        GIL from the step that runs next."""
        with self._post_lock:
            self._posted.append((events, event))
            wake = len(self._posted) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

    def _deliver(self) -> None:
        with self._post_lock:
            posted, self._posted = self._posted, []
        for events, event in posted:
            events.put_nowait(event)

    # ---- routes ---------------------------------------------------------------------------------------
    def _check_key(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise api.ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key")
        if not hmac.compare_digest(auth[7:].strip().encode(), self.api_key.encode()):
            raise api.ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8",
                            headers={"Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                     "script-src 'unsafe-inline'", "Cache-Control": "no-cache"})

    async def health(self, request: web.Request) -> web.Response:
        if self.batcher.draining_since is not None:
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok", **self.batcher.load()})

    async def models(self, request: web.Request) -> web.Response:
        try:
            self._check_key(request)
        except api.ApiError as e:
            return _error(e)
        return web.json_response(api.models(self.limits, self.created))

    async def _body(self, request: web.Request):
        if request.content_length is not None and request.content_length > self.max_body:
            raise api.ApiError(413, f"the request body is {request.content_length} bytes; this server takes at "
                               f"most {self.max_body} (--max-body)", code="request_too_large")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise api.ApiError(413, f"the request body is larger than {self.max_body} bytes (--max-body)",
                               code="request_too_large") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise api.ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _prompt_ids(self, req: api.GenRequest) -> list[int]:
        if req.chat:
            if not self.tok.has_chat_template:
                raise api.ApiError(400, "this model has no chat template: use /v1/completions")
            ids = self.tok.encode_chat([{"role": r, "content": c} for r, c in req.messages])
        else:
            ids = self.tok.encode(req.prompt)
        if not ids:
            raise api.ApiError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    async def completions(self, request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        try:
            self._check_key(request)
            body = await self._body(request)
            req = (api.parse_chat if chat else api.parse_completion)(body, self.limits)
            ids = self._prompt_ids(req)
            max_new = api.budget(req, len(ids), self.limits)
        except api.ApiError as e:
            return _error(e)
        events = asyncio.Queue()

        def emit(*event):  # from the decode thread
            self._post(events, event)

        seq = Sequence(ids, max_new, SamplingConfig(req.temperature, 0, req.top_p, req.seed, req.repetition_penalty),
                       req.stop, emit, rid=api.new_id(req))
        try:
            self.batcher.submit(seq)
        except QueueFull:
            return _error(api.ApiError(429, f"the queue is full ({self.batcher.max_queue} requests waiting); retry "
                                       f"later", type_="rate_limit_error", code="queue_full",
                                       headers={"Retry-After": str(RETRY_AFTER_S)}))
        except ShuttingDown:
            return _error(api.ApiError(503, "the server is shutting down", type_="server_error",
                                       code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_S)}))
        self.open += 1
        try:
            if req.stream:
                return await self._stream(request, req, seq, events)
            return await self._whole(request, req, seq, events)
        finally:
            self.open -= 1
            if not seq.cancelled:
                seq.cancel()  # finished already (a no-op), or the client went away: free the slot next step
            self.batcher.wake()

    async def _whole(self, request, req: api.GenRequest, seq: Sequence, events: asyncio.Queue) -> web.Response:
        rid, created, parts = seq.rid, api.now(), []
        while True:
            kind, *rest = await events.get()
            if kind == "text":
                parts.append(rest[0])
            elif kind == "done":
                finish, pt, ct, cached = rest
                return web.json_response(api.response(req, rid, created, "".join(parts), finish,
                                                      api.usage(pt, ct, cached)))
            else:  # written here, not after returning: the process may be about to end (wait_answered)
                resp = _error(api.ApiError(rest[0], rest[1], type_="server_error"))
                await resp.prepare(request)
                await resp.write_eof()
                return resp

    async def _stream(self, request, req: api.GenRequest, seq: Sequence, events: asyncio.Queue):
        rid, created = seq.rid, api.now()
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)
        if req.chat:
            await resp.write(_sse(api.chunk(req, rid, created, first=True)))
        while True:
            kind, *rest = await events.get()
            if kind == "text":
                await resp.write(_sse(api.chunk(req, rid, created, text=rest[0])))
            elif kind == "done":
                finish, pt, ct, cached = rest
                await resp.write(_sse(api.chunk(req, rid, created, finish=finish)))
                if req.include_usage:
                    await resp.write(_sse(api.chunk(req, rid, created, use=api.usage(pt, ct, cached))))
                break
            else:
                err = api.ApiError(rest[0], rest[1], type_="server_error")
                await resp.write(_sse(err.body()))
                break
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
