"""patches/http_server_app.py: a /v1/chat/completions POST whose body is JSON but not an object gets SGLang's 400
error body instead of the 500 SGLang 0.5.17 answers (ChatCompletionRequest's before-validators call `.get` on the
body); every other body and path reaches the app unchanged, streamed responses included, and the 400 passes through
SGLang's CORS middleware. On a FastAPI app with SGLang's own ChatCompletionRequest and body parsing (ORJSONRoute)."""
import fastapi
import pytest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

from patches import http_server_app


def make_app(with_check: bool):
    from sglang.srt.entrypoints.http_server import ORJSONRoute

    app = fastapi.FastAPI()
    app.router.route_class = ORJSONRoute            # as SGLang's app parses bodies
    app.add_middleware(CORSMiddleware, allow_origins=["*"])                # as SGLang's app

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        if req.stream:
            return StreamingResponse(iter([b"data: 1\n\n", b"data: 2\n\n"]), media_type="text/event-stream")
        return {"n_messages": len(req.messages)}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return {"items": len(await request.json())}

    if with_check:
        http_server_app.install(app)
        http_server_app.install(app)            # idempotent
        assert [m.cls for m in app.user_middleware] == [CORSMiddleware, http_server_app.JSONObjectBody]   # innermost
    return app


JSON = {"content-type": "application/json"}
CHAT = b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}]}'


@pytest.mark.parametrize("body,got", [(b'["model", "default"]', "array"), (b'  "text"', "string"), (b"7", "number"),
                                      (b"null", "null")])
def test_a_json_body_that_is_no_object_is_a_400(body, got):
    r = TestClient(make_app(True), headers=JSON).post("/v1/chat/completions", content=body,
                                                      headers={"origin": "http://example.com"})
    assert r.status_code == 400
    assert r.json()["message"] == f"the request body must be a JSON object, not a JSON {got}"
    assert r.json()["code"] == 400 and r.json()["object"] == "error"
    assert r.headers["access-control-allow-origin"] == "*"                 # SGLang's CORS middleware answered too


def test_without_the_check_sglangs_request_model_answers_a_list_with_a_500():
    bare = TestClient(make_app(False), raise_server_exceptions=False, headers=JSON)
    assert bare.post("/v1/chat/completions", content=b'["model", "default"]').status_code == 500


def test_objects_broken_json_and_other_paths_reach_the_app_unchanged():
    c = TestClient(make_app(True), headers=JSON)
    assert c.post("/v1/chat/completions", content=CHAT).json() == {"n_messages": 1}
    streamed = c.post("/v1/chat/completions", content=CHAT[:-1] + b', "stream": true}')
    assert streamed.status_code == 200 and streamed.text == "data: 1\n\ndata: 2\n\n"
    assert c.post("/v1/chat/completions", content=b'["model"').status_code == 422      # FastAPI's own refusal
    bom = c.post("/v1/chat/completions", content=b"\xef\xbb\xbf" + CHAT)              # not ours to refuse
    assert "must be a JSON object" not in bom.text
    assert c.post("/v1/completions", content=b"[1, 2, 3]").json() == {"items": 3}      # another path
