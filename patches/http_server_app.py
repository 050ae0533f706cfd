"""sglang.srt.entrypoints.http_server.app (an ASGI middleware inside SGLang's FastAPI app, not a HookRegistry hook):
a POST to /v1/chat/completions whose body is JSON but not an object (a list, a string, a number) gets SGLang's own
400 error body instead of a 500 and a traceback in the server log: SGLang 0.5.17's ChatCompletionRequest calls
`values.get(...)` in its before-validators (set_json_schema, ...), which raises AttributeError on such a body. (Its
other endpoints answer such bodies with their own 400s, in their own error shapes, so they are left alone.) The routes
hold the request model from the moment http_server is imported, so the check has to sit in front of the route; it
goes innermost, after SGLang's CORS and decompression middleware, so the 400 carries CORS headers and the check sees
the decompressed body. Installed by sglang_tca.cli before it starts the HTTP server with TCA (the scheduler
processes have no HTTP server, so this is not in PATCH_MODULES; extra tokenizer workers, --tokenizer-worker-num > 1,
would load SGLang's app afresh without it, so TCA refuses that flag)."""
from __future__ import annotations

import orjson

from patches import require_sglang

TARGET = "sglang.srt.entrypoints.http_server.app"
PATH = "/v1/chat/completions"
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


class JSONObjectBody:
    """Refuse, with 400, a chat-completions body that is valid JSON but not an object; pass everything else on
    untouched (the body is replayed to the app; later receive() calls, e.g. disconnect checks, go to the client)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if body.lstrip()[:1] != b"{":                      # an object body (the usual one) is not parsed twice
            parsed = _parse(body)
            if parsed is not None and not isinstance(parsed[0], dict):
                return await _bad_request(scope, receive, send, JSON_TYPES.get(type(parsed[0]), "value"))
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _parse(body: bytes) -> tuple | None:
    """(the JSON value,) of `body` as SGLang parses it (orjson: no byte-order mark), or None when it is no JSON."""
    try:
        return (orjson.loads(body),)
    except orjson.JSONDecodeError:
        return None


async def _bad_request(scope, receive, send, got: str):
    from sglang.srt.entrypoints.openai.protocol import ErrorResponse
    from starlette.responses import JSONResponse

    err = ErrorResponse(message=f"the request body must be a JSON object, not a JSON {got}",
                        type="Bad Request", code=400)
    await JSONResponse(status_code=400, content=err.model_dump())(scope, receive, send)


def install(app=None) -> None:
    """Add the middleware to SGLang's app (or to `app`), once."""
    require_sglang(target=TARGET)
    if app is None:
        from sglang.srt.entrypoints.http_server import app
    from starlette.middleware import Middleware

    if not any(m.cls is JSONObjectBody for m in app.user_middleware):
        app.user_middleware.append(Middleware(JSONObjectBody))     # last = innermost (add_middleware: outermost)
