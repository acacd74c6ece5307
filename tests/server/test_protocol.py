"""Request-body pieces that the HTTP tests reach only one case at a time: JSON depth, API keys, and which field
a validation error names."""

import json
import time

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from expertmesh.platform.server.errors import validation_error_response
from expertmesh.platform.server.middleware import json_depth
from expertmesh.platform.server.protocol import ChatCompletionRequest, CompletionRequest
from expertmesh.platform.server.settings import API_KEY_ENV, read_api_keys

FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)


# -- json_depth -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "depth"), [
    (b"", 0), (b"5", 0), (b"{}", 1), (b'{"a": [1, {"b": []}]}', 4), (b"[[]][[[]]]", 3),
    (b'{"a": "[[[{{{"}', 1),  # brackets inside strings do not count
    (b'{"a": "\\"[[", "b": [1]}', 2),  # nor after an escaped quote
    (b'["\\\\", [[1]]]', 3),  # an escaped backslash ends before the closing quote
    (b'["unterminated [[[', 1),  # the rest of an unterminated string is string
    (b"]]]", 0),
])
def test_json_depth(body, depth):
    assert json_depth(body) == depth


def test_json_depth_is_linear_in_the_body():
    # An unterminated string of escaped quotes made the previous scanner rescan from every quote: 7 s for
    # this 40 kB body, an hour for 1 MB, all of it blocking the event loop.
    start = time.perf_counter()
    assert json_depth(b'"' + b'\\"' * 20_000) == 0
    assert json_depth(b"[" * 1_000_000) == 1_000_000
    assert time.perf_counter() - start < 1.0


# -- read_api_keys ----------------------------------------------------------------------------------------
def test_read_api_keys_from_file_and_env(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nkey-a\n\n  key-b  \n# key-c\nkey-a\n")
    keys = read_api_keys(str(key_file), env={API_KEY_ENV: " key-d , key-b,,"})
    assert keys == ("key-a", "key-b", "key-d")  # file order first, then the env's, each once


def test_read_api_keys_env_only_and_none():
    assert read_api_keys(env={API_KEY_ENV: "k1,k2"}) == ("k1", "k2")
    assert read_api_keys(env={}) == ()


def test_read_api_keys_refuses_missing_or_empty_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_api_keys(str(tmp_path / "absent"), env={})
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(str(empty), env={})


# -- validation_error_response ----------------------------------------------------------------------------
def refusal(model: type, body: dict) -> dict:
    """The error the server would answer `body` with, as FastAPI hands it over (loc under `body`)."""
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    response = validation_error_response(RequestValidationError(errors), FIELDS)
    assert response.status_code == 400
    return json.loads(response.body)["error"]


@pytest.mark.parametrize(("body", "param", "says"), [
    # a value no union member takes: the member that got furthest speaks, not the first one tried
    ({"prompt": ["a"] * 100}, "prompt", "at most 64 items"),
    ({"prompt": [[1], [2, "x"]]}, "prompt[1][1]", "valid integer"),
    ({"prompt": [1, 2, "x"]}, "prompt[2]", "valid integer"),
    ({"prompt": "x", "stop": ["a"] * 5}, "stop", "at most 4 items"),
    # a type no member takes: every type that would do
    ({"prompt": {"text": "x"}}, "prompt", "a valid string or a valid list"),
    ({"prompt": "x", "stop": 5}, "stop", "a valid string or a valid list"),
    # a check over the whole body names the field its message starts with
    ({"prompt": "x", "echo": True}, "echo", "not supported"),
    ({"prompt": "x", "max_tokens": 1, "min_tokens": 2}, "min_tokens", "must not exceed"),
])
def test_completion_refusal_names_the_field(body, param, says):
    error = refusal(CompletionRequest, {"model": "m", **body})
    assert error["param"] == param
    assert error["message"].startswith(param) and says in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio"}]},
     "messages[0].content[1].type"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
    ({"role": "user", "content": "ok", "name": 5}, "messages[0].name"),
])
def test_chat_refusal_names_the_nested_field(message, param):
    assert refusal(ChatCompletionRequest, {"model": "m", "messages": [message]})["param"] == param


def test_refusal_without_a_field():
    # a model-level message that does not start with a field: no param rather than a wrong one
    response = validation_error_response(
        RequestValidationError([{"type": "value_error", "loc": ("body",), "msg": "Value error, something off"}]),
        FIELDS)
    error = json.loads(response.body)["error"]
    assert error == {"message": "something off", "type": "invalid_request_error", "param": None, "code": None}


# -- protocol ---------------------------------------------------------------------------------------------
def test_prompts_normalises_every_prompt_form():
    def prompts(prompt):
        return CompletionRequest(model="m", prompt=prompt).prompts()

    assert prompts("a") == ["a"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2]) == [[1, 2]]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_numbers_are_strict_but_ints_pass_for_floats():
    assert CompletionRequest(model="m", prompt="a", temperature=1, top_p=1).temperature == 1.0
    for field, value in [("temperature", True), ("temperature", "1"), ("max_tokens", 1.0), ("n", "2"),
                         ("stream", 1), ("seed", 2**63), ("seed", -(2**63) - 1)]:
        with pytest.raises(ValidationError):
            CompletionRequest(model="m", prompt="a", **{field: value})
