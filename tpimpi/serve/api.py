"""The OpenAI-style API's shapes: requests checked into frozen records, responses and errors as dicts.

Pure functions, no I/O: the HTTP layer (http.py) parses JSON and calls these; every bad field becomes an
ApiError with the status and the message a client shows.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API


class ApiError(Exception):
    """An error answered as {"error": {...}} with this HTTP status (and headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the server accepts: its model's name, context and the most tokens one request may ask for."""

    model: str
    max_seq: int
    max_tokens: int


@dataclass(frozen=True)
class GenRequest:
    """One checked request. Exactly one of messages (chat) and prompt (completion) is set."""

    model: str
    messages: tuple[tuple[str, str], ...] | None
    prompt: str | None
    max_tokens: int | None  # None: as many as fit, up to Limits.max_tokens
    temperature: float
    top_p: float
    seed: int
    repetition_penalty: float  # an extension (as vLLM's): transformers' repetition penalty, 1 = none
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @property
    def chat(self) -> bool:
        return self.messages is not None


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"'{key}' must be a number from {lo} to {hi}, got {v!r}", key)
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"'{key}' must be an integer from {lo} to {hi}, got {v!r}", key)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    return tuple(s for s in stops if s)


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):  # content parts: text only
        return "".join(p["text"] for p in c)
    if c is None and m.get("role") == "assistant":
        return ""
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _common(body, limits: Limits, **fields) -> GenRequest:
    model = body.get("model", limits.model)
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if model != limits.model:
        raise ApiError(404, f"The model '{model}' does not exist; this server runs '{limits.model}'",
                       code="model_not_found", param="model")
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported", "n")
    max_tokens = _int(body, "max_completion_tokens", 1, limits.max_tokens)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, limits.max_tokens)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise _bad("'stream_options' must be an object with a boolean include_usage", "stream_options")
    return GenRequest(model=model, max_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(body, "top_p", 1.0, 1e-9, 1.0), seed=_int(body, "seed", 0, 2**63 - 1) or 0,
                      repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 100.0),
                      stop=_stop(body), stream=stream, include_usage=stream and opts.get("include_usage", False),
                      **fields)


def parse_chat(body, limits: Limits) -> GenRequest:
    """A /v1/chat/completions body -> GenRequest (raises ApiError 400/404)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES + ("developer",):
            raise _bad(f"messages[{i}] needs a role of {', '.join(ROLES)}", f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append((role, _content(m, i)))
    return _common(body, limits, messages=tuple(out), prompt=None)


def parse_completion(body, limits: Limits) -> GenRequest:
    """A /v1/completions body -> GenRequest (raises ApiError 400/404)."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str) or not p:
        raise _bad("'prompt' must be a non-empty string", "prompt")
    return _common(body, limits, messages=None, prompt=p)


def budget(req: GenRequest, prompt_tokens: int, limits: Limits) -> int:
    """Tokens this request may generate; ApiError 400 with the numbers when its prompt does not fit."""
    room = limits.max_seq - prompt_tokens
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {limits.max_seq} tokens. However, your "
                       f"{'messages' if req.chat else 'prompt'} resulted in {prompt_tokens} tokens. Please reduce "
                       f"the length of the {'messages' if req.chat else 'prompt'}.", code="context_length_exceeded",
                       param="messages" if req.chat else "prompt")
    if req.max_tokens is not None and req.max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {limits.max_seq} tokens. However, you "
                       f"requested {prompt_tokens + req.max_tokens} tokens ({prompt_tokens} in the "
                       f"{'messages' if req.chat else 'prompt'}, {req.max_tokens} in the completion). Please "
                       f"reduce the length of the {'messages' if req.chat else 'prompt'} or completion.",
                       code="context_length_exceeded", param="max_tokens")
    return min(req.max_tokens or limits.max_tokens, room)


# ---- responses ----------------------------------------------------------------------------------------


def new_id(req: GenRequest) -> str:
    return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """The usage object; prompt_tokens_details.cached_tokens: prompt tokens the prompt cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response(req: GenRequest, rid: str, created: int, text: str, finish: str, use: dict) -> dict:
    """The whole answer of a request that did not stream."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice, obj = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}, "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": req.model, "choices": [choice], "usage": use}


def chunk(req: GenRequest, rid: str, created: int, text: str | None = None, finish: str | None = None,
          first: bool = False, use: dict | None = None) -> dict:
    """One server-sent event's object: a text delta, the finish reason, or (choices empty) the usage."""
    if use is not None:
        choices = []
    elif req.chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": req.model, "choices": choices}
    if req.include_usage:
        out["usage"] = use
    return out


def models(limits: Limits, created: int) -> dict:
    return {"object": "list", "data": [{"id": limits.model, "object": "model", "created": created,
                                        "owned_by": "tpimpi"}]}


def now() -> int:
    return int(time.time())
