"""patches/http_server_app.py: a /v1/ POST whose body is JSON but not an object gets SGLang's 400 error body instead
of the 500 SGLang 0.5.17 answers (its request models' before-validators call `.get` on the body); every other body
reaches the app unchanged, streamed responses included. On a FastAPI app with SGLang's own ChatCompletionRequest."""
import fastapi
import pytest
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

from patches import http_server_app


def make_app(with_check: bool):
    from sglang.srt.entrypoints.http_server import ORJSONRoute

    app = fastapi.FastAPI()
    app.router.route_class = ORJSONRoute            # as SGLang's app parses bodies

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        if req.stream:
            return StreamingResponse(iter([b"data: 1\n\n", b"data: 2\n\n"]), media_type="text/event-stream")
        return {"n_messages": len(req.messages)}

    @app.post("/generate")
    async def generate(request: fastapi.Request):
        return {"items": len(await request.json())}

    if with_check:
        http_server_app.install(app)
        http_server_app.install(app)            # idempotent
        assert len(app.user_middleware) == 1
    return app


JSON = {"content-type": "application/json"}
CHAT = b'{"model": "default", "messages": [{"role": "user", "content": "Hi"}]}'


@pytest.mark.parametrize("body,got", [(b'["model", "default"]', "list"), (b'  "text"', "str"), (b"7", "int")])
def test_a_json_body_that_is_no_object_is_a_400(body, got):
    r = TestClient(make_app(True), headers=JSON).post("/v1/chat/completions", content=body)
    assert r.status_code == 400
    assert r.json()["message"] == f"the request body must be a JSON object, not a JSON {got}"
    assert r.json()["code"] == 400 and r.json()["object"] == "error"


def test_without_the_check_sglangs_request_model_answers_a_list_with_a_500():
    bare = TestClient(make_app(False), raise_server_exceptions=False, headers=JSON)
    assert bare.post("/v1/chat/completions", content=b'["model", "default"]').status_code == 500


def test_objects_broken_json_and_other_paths_reach_the_app_unchanged():
    c = TestClient(make_app(True), headers=JSON)
    assert c.post("/v1/chat/completions", content=CHAT).json() == {"n_messages": 1}
    streamed = c.post("/v1/chat/completions", content=CHAT[:-1] + b', "stream": true}')
    assert streamed.status_code == 200 and streamed.text == "data: 1\n\ndata: 2\n\n"
    assert c.post("/v1/chat/completions", content=b'["model"').status_code == 422      # FastAPI's own refusal
    assert c.post("/generate", content=b"[1, 2, 3]").json() == {"items": 3}             # not a /v1/ path
