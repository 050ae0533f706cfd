"""sglang.srt.entrypoints.http_server.app (an ASGI middleware in front of SGLang's FastAPI app, not a HookRegistry
hook): a POST to an OpenAI-compatible endpoint (/v1/...) whose body is JSON but not an object (a list, a string, a
number) gets SGLang's own 400 error body instead of a 500 and a traceback in the server log. SGLang 0.5.17's request
models call `values.get(...)` in their before-validators (e.g. ChatCompletionRequest.set_json_schema), which raises
AttributeError on such a body; the routes hold those models from the moment http_server is imported, so the check
has to sit in front of the app. Installed by sglang_tca.cli before it starts the HTTP server with TCA (the scheduler
processes have no HTTP server, so this is not in PATCH_MODULES)."""
from __future__ import annotations

import json

from patches import require_sglang

TARGET = "sglang.srt.entrypoints.http_server.app"


class JSONObjectBody:
    """Refuse, with 400, a /v1/ POST body that is valid JSON but not an object; pass everything else on untouched
    (the body is replayed to the app, later receive() calls, e.g. disconnect checks, go to the client)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        head = body.lstrip()[:1]
        if head and head != b"{" and _is_json(body):      # only a non-object body pays for a second parse
            return await _bad_request(scope, receive, send, type(json.loads(body)).__name__)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


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
    if not any(m.cls is JSONObjectBody for m in app.user_middleware):
        app.add_middleware(JSONObjectBody)
