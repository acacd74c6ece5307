"""Fuzzing the live server: no input gets a 5xx, every refusal has OpenAI's error shape, no engine step
fails, and the server still answers afterwards.

Two sources of requests:
- schemathesis, from the app's own OpenAPI schema, positive and negative, every operation;
- hypothesis, over the sampling values and prompts that reach the engine. Schema-generated bodies rarely
  get there (a random model name is a 404; random extra values trip a refusal first), yet the engine is
  where a value the schema allows can still break a step: a top_p that rounds to 0 in float32, a top_k
  past int64, a seed past what torch.Generator takes, a lone surrogate in the text.

Only schemathesis's `not_a_server_error` check runs. Its conformance checks would flag what is meant: our
400s and 401s are not declared in FastAPI's schema (which lists 422 only); the schema cannot say that
`presence_penalty: 1` or a prompt longer than the context is refused; and for an "integer" it generates
floats such as `5.0`, which our strict types refuse (as `"5"`), so `positive_data_acceptance` would count
those refusals as failures.
"""

import json
from pathlib import Path

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.server.app_server import API_KEY, running_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_TOKENS_LIMIT = 16  # fuzzed requests cannot generate for long
EXAMPLES = 100  # per operation; the GET ones without parameters stop after their one distinct case
# The app's operations, listed so each is its own test (schemathesis's lazy `from_fixture` loader, which would
# find them in the live schema, fails under pytest 9); a test checks the list against the schema.
OPERATIONS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
              ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/experts"), ("GET", "/dashboard"),
              ("POST", "/v1/experts/rebalance"), ("POST", "/v1/experts/scale"), ("POST", "/v1/load_lora_adapter"),
              ("POST", "/v1/unload_lora_adapter")]
SAMPLING_EXAMPLES = 300  # cheap: most are refused, the rest generate a few tokens
REFUSED = ("presence_penalty", "frequency_penalty", "logit_bias", "echo", "suffix", "best_of")
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tiny_model_dir, single_threaded_torch):
    with running_app(tiny_model_dir, engine_kwargs={"max_model_len": 128}, max_tokens_limit=MAX_TOKENS_LIMIT,
                     default_max_tokens=4) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(server):
    url, _ = server
    return schemathesis.openapi.from_url(f"{url}/openapi.json", headers=AUTH)


@pytest.fixture(scope="module")
def client(server):
    url, _ = server
    with httpx.Client(base_url=url, headers=AUTH, timeout=120) as c:
        yield c


def assert_answered(status: int, content_type: str, text: str) -> None:
    """A refusal in OpenAI's shape, or a stream that ends in [DONE] with no error event; never a 5xx."""
    assert status < 500, text[:1000]
    if status >= 400:
        body = json.loads(text)
        assert set(body) == {"error"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
        assert isinstance(body["error"]["type"], str) and body["error"]["type"], body
        assert "param" in body["error"], body
    elif content_type.startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-1000:]
        for event in events[:-1]:
            assert "error" not in json.loads(event), event  # an error mid-stream is a failure of ours


def steer_to_engine(body: dict, model: str) -> None:
    """Names the served model and drops what the server refuses by design, so that more generated bodies get
    past those checks."""
    body["model"] = model
    for name in REFUSED:
        body.pop(name, None)


def test_every_operation_is_fuzzed(api_schema):
    found = {(result.ok().method.upper(), result.ok().path) for result in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_schema_fuzzed_request_gets_no_server_error(api_schema, server, tiny_model_dir, method, path):
    url, _ = server
    model = Path(tiny_model_dir).name
    operation = api_schema[path][method]
    cases = st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode])

    @given(case=cases, steer=st.booleans())
    @FUZZ_SETTINGS
    def check(case, steer):
        if steer and isinstance(case.body, dict):
            steer_to_engine(case.body, model)
        response = case.call_and_validate(base_url=url, headers=AUTH, checks=[not_a_server_error], timeout=120)
        assert_answered(response.status_code, response.headers.get("content-type", [""])[0], response.text)

    check()


# Plain values, and the edges where a number stops fitting what the engine turns it into: float32 (a top_p
# of 1e-50 is 0.0 there), int64 (top_k, seed), torch.Generator's uint64 seed.
_numbers = st.one_of(st.floats(min_value=0, max_value=2), st.integers(-2, 3), st.floats(),  # NaN and inf too
                     st.sampled_from([5e-324, 1e-50, 1e-45, 1e-6, 1 - 1e-16, 2 + 1e-15]))
_ints = st.one_of(st.integers(-2, 40), st.integers(),
                  st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**80, -(2**63), -(2**63) - 1]))
_texts = st.one_of(st.text(max_size=40),  # and lone surrogates, which JSON carries as \ud800 escapes
                   st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2))
_sampling = {
    "temperature": _numbers, "top_p": _numbers, "top_k": _ints, "seed": _ints,
    "n": st.one_of(st.integers(1, 3), st.integers(0, 9)),
    "max_tokens": st.integers(-1, MAX_TOKENS_LIMIT + 1), "min_tokens": st.integers(-1, MAX_TOKENS_LIMIT + 1),
    "stop": st.one_of(_texts, st.lists(_texts, max_size=5)), "stream": st.booleans(), "ignore_eos": st.booleans(),
}
_prompts = st.one_of(_texts, st.lists(_texts, min_size=1, max_size=3), st.lists(_ints, min_size=1, max_size=20),
                     st.lists(st.lists(st.integers(0, 2047), min_size=1, max_size=8), min_size=1, max_size=3))
_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                            "content": _texts}), min_size=1, max_size=3)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_sampling_values_get_no_server_error(client, tiny_model_dir, path):
    chat = path.endswith("chat/completions")
    extra = {"logprobs": st.booleans(), "top_logprobs": st.integers(0, 21)} if chat else {
        "logprobs": st.integers(-1, 21)}
    bodies = st.fixed_dictionaries({"messages": _messages} if chat else {"prompt": _prompts},
                                   optional={**_sampling, **extra})

    @given(body=bodies)
    @settings(FUZZ_SETTINGS, max_examples=SAMPLING_EXAMPLES)
    def check(body):
        body["model"] = Path(tiny_model_dir).name
        # Python's json writes NaN and Infinity, which the server's parser reads: they must be refused too
        r = client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
        assert_answered(r.status_code, r.headers.get("content-type", ""), r.text)

    check()


def test_server_still_answers_after_fuzzing(server, client, tiny_model_dir):
    _, engine = server
    assert engine.stats.failed_steps == 0  # no fuzzed request broke a batch (and everyone else's requests in it)
    assert engine.alive
    assert client.get("/health").status_code == 200
    r = client.post("/v1/completions", json={"model": Path(tiny_model_dir).name, "prompt": "Hello",
                                              "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
