"""Bad requests get a 4xx in OpenAI's error shape naming the field at fault, never a 5xx, a hang, or a
broken server; API keys guard every route but /health; values right at the limits are accepted."""

import json
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.server.app_server import API_KEY, running_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {**AUTH, "Content-Type": "application/json"}
MAX_MODEL_LEN = 64
MAX_TOKENS_LIMIT = 8
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
MODEL = "<model>"  # replaced by the served model's name


@pytest.fixture(scope="module")
def server(tiny_model_dir, single_threaded_torch):
    with running_app(tiny_model_dir, engine_kwargs={"max_model_len": MAX_MODEL_LEN},
                     max_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=4) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:  # a request that hangs fails the test
        yield c


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return Path(tiny_model_dir).name


def cmpl(**fields) -> dict:
    return {"model": MODEL, "prompt": "hi", **fields}


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, **fields}


def raw(text: str) -> bytes:
    return text.replace(MODEL, "tiny_model0").encode()  # the name does not matter for these


# (id, method, path, body: a dict sent as JSON, bytes sent as they are, or None; status, param)
CASES = [
    # the body itself
    ("malformed JSON", "POST", CMPL, b'{"model": "m", "prompt": ', 400, None),
    ("trailing garbage", "POST", CMPL, b'{"model": "m", "prompt": "hi"} x', 400, None),
    ("array body", "POST", CMPL, b"[]", 400, None),
    ("string body", "POST", CMPL, b'"hi"', 400, None),
    ("number body", "POST", CMPL, b"5", 400, None),
    ("missing body", "POST", CMPL, None, 400, None),
    ("not UTF-8", "POST", CMPL, b'{"model": "\xff\xfe"}', 400, None),
    ("deeply nested", "POST", CMPL, b"[" * 10_000, 400, None),
    ("deeply nested field", "POST", CMPL, raw('{"model": "m", "prompt": ' + "[" * 100 + "]" * 100 + "}"), 400, None),
    ("unterminated escapes", "POST", CMPL, b"\"" + b"\\\"" * 50_000, 400, None),  # its timing: test_protocol.py
    ("2 MB body", "POST", CMPL, json.dumps(cmpl(prompt="x" * (2 << 20))).encode(), 413, None),
    # completions: types
    ("missing model", "POST", CMPL, {"prompt": "hi"}, 400, "model"),
    ("model not a string", "POST", CMPL, cmpl(model=5), 400, "model"),
    ("missing prompt", "POST", CMPL, {"model": MODEL}, 400, "prompt"),
    ("max_tokens string", "POST", CMPL, cmpl(max_tokens="5"), 400, "max_tokens"),
    ("max_tokens float", "POST", CMPL, cmpl(max_tokens=5.5), 400, "max_tokens"),
    ("stream string", "POST", CMPL, cmpl(stream="yes"), 400, "stream"),
    ("temperature string", "POST", CMPL, cmpl(temperature="hot"), 400, "temperature"),
    ("temperature bool", "POST", CMPL, cmpl(temperature=True), 400, "temperature"),
    ("prompt number", "POST", CMPL, cmpl(prompt=5), 400, "prompt"),
    ("prompt null", "POST", CMPL, cmpl(prompt=None), 400, "prompt"),
    ("prompt [[]]", "POST", CMPL, cmpl(prompt=[[]]), 400, "prompt[0]"),
    ("prompt []", "POST", CMPL, cmpl(prompt=[]), 400, "prompt"),
    ("prompt mixed list", "POST", CMPL, cmpl(prompt=[1, "a"]), 400, "prompt[1]"),
    ("prompt negative id", "POST", CMPL, cmpl(prompt=[-1]), 400, "prompt[0]"),
    ("prompt lone surrogate", "POST", CMPL, raw('{"model": "m", "prompt": "a\\ud800"}'), 400, "prompt"),
    ("stop lone surrogate", "POST", CMPL, raw('{"model": "m", "prompt": "a", "stop": ["\\udfff"]}'), 400,
     "stop[0]"),
    # completions: values
    ("unknown model", "POST", CMPL, cmpl(model="gpt-4"), 404, "model"),
    ("empty prompt", "POST", CMPL, cmpl(prompt=""), 400, "prompt"),
    ("empty prompt in list", "POST", CMPL, cmpl(prompt=["a", ""]), 400, "prompt"),
    ("prompt ids over context", "POST", CMPL, cmpl(prompt=list(range(1, MAX_MODEL_LEN + 2))), 400, "prompt"),
    ("prompt text over context", "POST", CMPL, cmpl(prompt="hello world " * 100), 400, "prompt"),
    ("prompt id past vocabulary", "POST", CMPL, cmpl(prompt=[10**9]), 400, "prompt"),
    ("prompt id past int64", "POST", CMPL, cmpl(prompt=[2**80]), 400, "prompt"),
    ("10,000 prompts", "POST", CMPL, cmpl(prompt=["a"] * 10_000), 400, "prompt"),
    ("temperature -1", "POST", CMPL, cmpl(temperature=-1), 400, "temperature"),
    ("temperature 3", "POST", CMPL, cmpl(temperature=3), 400, "temperature"),
    ("temperature NaN", "POST", CMPL, raw('{"model": "m", "prompt": "a", "temperature": NaN}'), 400,
     "temperature"),
    ("temperature Infinity", "POST", CMPL, raw('{"model": "m", "prompt": "a", "temperature": Infinity}'), 400,
     "temperature"),
    ("top_p 0", "POST", CMPL, cmpl(top_p=0), 400, "top_p"),
    ("top_p 1.5", "POST", CMPL, cmpl(top_p=1.5), 400, "top_p"),
    ("top_p 1e-50", "POST", CMPL, cmpl(top_p=1e-50), 400, "top_p"),  # 0.0 in float32: no token left to sample
    ("top_k -2", "POST", CMPL, cmpl(top_k=-2), 400, "top_k"),
    ("top_k 2**70", "POST", CMPL, cmpl(top_k=2**70), 400, "top_k"),  # past the sampler's int64 tensor
    ("n 0", "POST", CMPL, cmpl(n=0), 400, "n"),
    ("n 100", "POST", CMPL, cmpl(n=100), 400, "n"),
    ("logprobs 21", "POST", CMPL, cmpl(logprobs=21), 400, "logprobs"),
    ("logprobs -1", "POST", CMPL, cmpl(logprobs=-1), 400, "logprobs"),
    ("max_tokens 0", "POST", CMPL, cmpl(max_tokens=0), 400, "max_tokens"),
    ("max_tokens -1", "POST", CMPL, cmpl(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens over the limit", "POST", CMPL, cmpl(max_tokens=MAX_TOKENS_LIMIT + 1), 400, "max_tokens"),
    ("max_tokens 10**9", "POST", CMPL, cmpl(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens 10**30", "POST", CMPL, cmpl(max_tokens=10**30), 400, "max_tokens"),
    ("min_tokens over max_tokens", "POST", CMPL, cmpl(max_tokens=2, min_tokens=3), 400, "min_tokens"),
    ("min_tokens over the default", "POST", CMPL, cmpl(min_tokens=10**6), 400, "min_tokens"),
    ("seed 2**80", "POST", CMPL, cmpl(seed=2**80), 400, "seed"),  # torch.Generator.manual_seed overflows
    ("seed below int64", "POST", CMPL, cmpl(seed=-(2**63) - 1), 400, "seed"),
    ("presence_penalty", "POST", CMPL, cmpl(presence_penalty=1), 400, "presence_penalty"),
    ("frequency_penalty", "POST", CMPL, cmpl(frequency_penalty=-0.5), 400, "frequency_penalty"),
    ("logit_bias", "POST", CMPL, cmpl(logit_bias={"50": -100}), 400, "logit_bias"),
    ("echo", "POST", CMPL, cmpl(echo=True), 400, "echo"),
    ("suffix", "POST", CMPL, cmpl(suffix="!"), 400, "suffix"),
    ("best_of", "POST", CMPL, cmpl(best_of=2), 400, "best_of"),
    ("stop with 5 strings", "POST", CMPL, cmpl(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop empty", "POST", CMPL, cmpl(stop=""), 400, "stop"),
    ("stop too long", "POST", CMPL, cmpl(stop=["x" * 300]), 400, "stop[0]"),
    ("stream_options without stream", "POST", CMPL, cmpl(stream_options={"include_usage": True}), 400,
     "stream_options"),
    # chat
    ("chat missing messages", "POST", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages string", "POST", CHAT, chat(messages="hi"), 400, "messages"),
    ("messages empty", "POST", CHAT, chat(messages=[]), 400, "messages"),
    ("message not an object", "POST", CHAT, chat(messages=["hi"]), 400, "messages[0]"),
    ("message bad role", "POST", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages[0].role"),
    ("message without role", "POST", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("message content number", "POST", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400,
     "messages[0].content"),
    ("message image part", "POST", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]), 400,
     "messages[0].content[0].type"),
    ("message lone surrogate", "POST", CHAT,
     raw('{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'), 400, "messages[0].content"),
    ("chat role the template refuses", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), 400,
     "messages"),
    ("chat over context", "POST", CHAT, chat(messages=[{"role": "user", "content": "hello world " * 100}]), 400,
     "messages"),
    ("chat unknown model", "POST", CHAT, chat(model="gpt-4"), 404, "model"),
    ("chat temperature string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("chat top_p 1.5", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("chat n 100", "POST", CHAT, chat(n=100), 400, "n"),
    ("chat max_tokens string", "POST", CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    ("chat max_tokens over the limit", "POST", CHAT, chat(max_tokens=10**9), 400, "max_tokens"),
    ("chat logprobs number", "POST", CHAT, chat(logprobs=5), 400, "logprobs"),
    ("chat top_logprobs 21", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("chat top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("chat both token limits", "POST", CHAT, chat(max_tokens=2, max_completion_tokens=2), 400,
     "max_completion_tokens"),
    ("chat presence_penalty", "POST", CHAT, chat(presence_penalty=1), 400, "presence_penalty"),
    ("chat seed 2**80", "POST", CHAT, chat(seed=2**80), 400, "seed"),
    ("chat stop with 5 strings", "POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    # elastic experts: a server in local mode has no shards to rebalance or scale
    ("rebalance in local mode", "POST", "/v1/experts/rebalance", {}, 400, None),
    ("rebalance force not a bool", "POST", "/v1/experts/rebalance", {"force": "yes"}, 400, "force"),
    ("rebalance unknown field", "POST", "/v1/experts/rebalance", {"forse": True}, 400, "forse"),
    ("scale in local mode", "POST", "/v1/experts/scale", {"expert_shards": 2}, 400, None),
    ("scale without a count", "POST", "/v1/experts/scale", {}, 400, "expert_shards"),
    ("scale count a string", "POST", "/v1/experts/scale", {"expert_shards": "2"}, 400, "expert_shards"),
    # routes and methods
    ("unknown route", "POST", "/v1/nope", cmpl(), 404, None),
    ("unknown GET route", "GET", "/v1/engines", None, 404, None),
    ("GET on completions", "GET", CMPL, None, 405, None),
    ("DELETE on models", "DELETE", "/v1/models", None, 405, None),
]


def _send(client: httpx.Client, method: str, path: str, body, model: str) -> httpx.Response:
    if isinstance(body, dict):
        return client.request(method, path, headers=JSON, content=json.dumps(body).replace(MODEL, model))
    return client.request(method, path, headers=JSON if body is not None else AUTH, content=body)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text[:1000]
    body = r.json()
    assert set(body) == {"error"}, body  # not FastAPI's {"detail": ...}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("method", "path", "body", "status", "param"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_request_gets_openai_error_naming_the_field(client, model, method, path, body, status, param):
    error = assert_openai_error(_send(client, method, path, body, model), status, param)
    if param is not None:
        assert param.split("[")[0].split(".")[0] in error["message"], error  # the message names it too


def test_server_still_answers_after_bad_requests(server, client, model):
    _, engine = server
    assert engine.stats.failed_steps == 0
    r = client.post(CMPL, headers=AUTH, json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").status_code == 200


# -- limits -----------------------------------------------------------------------------------------------
def test_body_without_json_content_type_is_refused_with_a_hint(client, model):
    body = json.dumps({"model": model, "prompt": "hi"})
    for headers in ({**AUTH, "Content-Type": "text/plain"}, AUTH):
        error = assert_openai_error(client.post(CMPL, headers=headers, content=body), 400)
        assert "Content-Type: application/json" in error["message"]


def test_chunked_body_over_the_limit_gets_413(client):
    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(40):
            yield b"x" * 65536

    assert_openai_error(client.post(CMPL, headers=JSON, content=chunks()), 413)


def test_requests_at_the_limits_are_accepted(client, model):
    ok = [
        cmpl(max_tokens=MAX_TOKENS_LIMIT, temperature=2, top_p=1, n=8),
        cmpl(max_tokens=1, top_k=-1, seed=2**63 - 1, logprobs=20),
        cmpl(max_tokens=1, top_k=2**31 - 1, seed=-(2**63), top_p=1e-6),
        cmpl(max_tokens=1, stop=["x" * 256] * 4, min_tokens=1),
        cmpl(max_tokens=1, prompt=list(range(1, MAX_MODEL_LEN))),  # leaves room for exactly one token
        cmpl(max_tokens=1, prompt=["a"] * 64),
        cmpl(max_tokens=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={}, echo=False, best_of=1),
        chat(max_completion_tokens=MAX_TOKENS_LIMIT, temperature=0, n=8, logprobs=True, top_logprobs=20),
        chat(max_tokens=1, messages=[{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    ]
    for body in ok:
        path = CHAT if "messages" in body else CMPL
        r = _send(client, "POST", path, body, model)
        assert r.status_code == 200, (body, r.text[:500])
        n_prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) and isinstance(
            body["prompt"][0], str) else 1
        assert len(r.json()["choices"]) == body.get("n", 1) * n_prompts


# -- API keys ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", CMPL), ("POST", CHAT),
                                              ("GET", "/metrics"), ("GET", "/v1/experts"),
                                              ("POST", "/v1/experts/rebalance"), ("POST", "/v1/experts/scale"),
                                              ("GET", "/openapi.json"), ("GET", "/v1/nope")])
def test_routes_need_a_key(client, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        r = client.request(method, path, headers=headers)
        error = assert_openai_error(r, 401)
        assert error["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"


def test_key_is_checked_before_the_body_is_read(client):
    r = client.post(CMPL, headers={"Content-Type": "application/json"}, content=b"x" * (2 << 20))
    assert_openai_error(r, 401)


def test_health_needs_no_key(client):
    assert client.get("/health").status_code == 200


def test_bearer_scheme_is_case_insensitive(client):
    assert client.get("/v1/models", headers={"Authorization": f"bearer {API_KEY}"}).status_code == 200


def test_a_key_in_the_query_opens_nothing(client):
    # the dashboard page needs no key (it holds no data); every data route takes the key only as a header
    assert client.get("/dashboard").status_code == 200
    assert_openai_error(client.get("/v1/models", params={"key": API_KEY}), 401)
    assert_openai_error(client.get("/v1/experts", params={"key": API_KEY}), 401)
    assert_openai_error(client.get("/metrics", params={"key": API_KEY}), 401)
