"""The real server (`expertmesh serve`: Ray Serve on a Ray of its own) driven by the official `openai` client.

Greedy outputs must equal the offline `LLM`'s for the same prompt; 32 concurrent streams must each get
what they would get alone; SIGTERM must take everything down within 60 s.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from expertmesh import LLM, SamplingParams
from tests.server.cli_server import cli_server

pytestmark = pytest.mark.slow

KEY = "serve-test-key"
PROMPTS = ["The mixture of experts", "Routing sends each token to", "A", "load balancing across shards keeps",
           "DeepSeek uses multi-head latent attention so that the cache"]
CHATS = [[{"role": "user", "content": "What is an expert?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a router."}]]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    with LLM(tiny_model_dir) as llm:
        greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
        completions = {p: llm.generate(p, greedy)[0].outputs[0] for p in PROMPTS}
        chats = [llm.chat(c, greedy)[0].outputs[0] for c in CHATS]
        # what each of the 32 streams would get alone: distinct prompts, seeded sampling for half of them
        alone = {}
        for i in range(32):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0 if i % 2 else 0.8, seed=i, ignore_eos=True)
            alone[i] = llm.generate(_stream_prompt(i), params)[0].outputs[0].text
    return completions, chats, alone


def _stream_prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]} {i}"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with cli_server(tiny_model_dir) as srv:
        yield srv
    # the fixture's exit sent SIGTERM: the CLI promises to be gone, with its Ray, within 60 s
    assert srv.proc.returncode is not None and srv.stop_seconds < 60, srv.output()[-3000:]
    assert not srv.leftover, f"processes left behind: {srv.leftover}"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def model_name(tiny_model_dir):
    return Path(tiny_model_dir).name


def test_cli_prints_url_key_and_curl(server):
    out = server.output()
    assert f"at {server.url}/v1" in out
    assert f"API key: {KEY}" in out
    assert re.search(r"curl http://127\.0\.0\.1:\d+/v1/completions .*Bearer " + KEY, out)


def test_models_and_health(client, server, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}  # no key needed
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_completions_equal_offline_greedy(client, offline, model_name, stream):
    completions, _, _ = offline
    for prompt in PROMPTS:
        expected = completions[prompt]
        if stream:
            chunks = list(client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            r = client.completions.create(model=model_name, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            text, finish, usage = r.choices[0].text, [r.choices[0].finish_reason], r.usage
        assert text == expected.text, prompt
        assert finish == [expected.finish_reason]
        assert usage.completion_tokens == len(expected.token_ids)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_offline_greedy(client, offline, model_name, stream):
    _, chats, _ = offline
    for messages, expected in zip(CHATS, chats):
        if stream:
            chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS,
                                                         temperature=0, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            r = client.chat.completions.create(model=model_name, messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
            assert r.choices[0].message.role == "assistant"
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert text == expected.text
        assert finish == expected.finish_reason


def test_token_id_prompts_n_and_logprobs(client, offline, model_name, tiny_model_dir):
    completions, _, _ = offline
    with LLM(tiny_model_dir) as llm:
        ids = llm.get_tokenizer().encode(PROMPTS[0])
    r = client.completions.create(model=model_name, prompt=[ids, ids], max_tokens=MAX_TOKENS, temperature=0, n=2,
                                  logprobs=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.text == completions[PROMPTS[0]].text for c in r.choices)
    assert r.usage.prompt_tokens == 2 * len(ids)  # each prompt counted once, whatever n
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == MAX_TOKENS or r.choices[0].finish_reason == "stop"
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)


def test_stop_string_is_not_streamed(client, offline, model_name):
    completions, _, _ = offline
    full = completions[PROMPTS[0]].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    if not stop.strip():
        pytest.skip("the greedy text has no usable stop string")
    cut = full[: full.index(stop)]
    chunks = list(client.completions.create(model=model_name, prompt=PROMPTS[0], max_tokens=MAX_TOKENS,
                                            temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_streams_each_get_what_they_would_alone(server, offline, model_name):
    _, _, alone = offline
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(i: int) -> str:
        stream = await client.completions.create(
            model=model_name, prompt=_stream_prompt(i), max_tokens=MAX_TOKENS, temperature=0 if i % 2 else 0.8,
            seed=i, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()

    texts = asyncio.run(asyncio.wait_for(all_of_them(), timeout=300))
    mismatched = [i for i in range(32) if texts[i] != alone[i]]
    assert not mismatched, [(i, texts[i], alone[i]) for i in mismatched]


def test_metrics_after_traffic(server, client, model_name):
    client.completions.create(model=model_name, prompt="metrics", max_tokens=4, temperature=0)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text

    def value(pattern: str) -> float:
        m = re.search(r"^" + pattern + r" ([0-9.e+-]+)$", text, re.MULTILINE)
        assert m, pattern
        return float(m.group(1))

    assert value(r'expertmesh_requests_total\{route="/v1/completions",status="200"\}') >= 1
    assert value(r"expertmesh_time_to_first_token_seconds_count") >= 1
    assert value(r'expertmesh_request_latency_seconds_count\{route="/v1/completions"\}') >= 1
    assert value(r"expertmesh_inter_token_latency_seconds_count") >= 1
    assert value(r"expertmesh_generation_tokens_total") >= 4
    assert value(r"expertmesh_kv_cache_blocks_total") > 0
    assert value(r"expertmesh_requests_running") == 0
    tokens = [float(v) for v in re.findall(r'^expertmesh_expert_tokens\{expert="\d+",layer="\d+"\} (\S+)$', text, re.MULTILINE)]
    assert tokens and sum(tokens) > 0
    assert 0 < value(r'expertmesh_routing_entropy\{layer="1"\}') <= 1
    assert 0 < value(r'expertmesh_expert_busiest_share\{layer="1"\}') <= 1
    assert value(r'expertmesh_layer_balancedness\{layer="1"\}') == 1.0  # local mode: one shard holds all
    assert value(r"expertmesh_placement_version") == 0


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    m = re.search(r"^" + name + r" ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


def test_client_disconnect_mid_stream_cancels_and_frees_blocks(server, model_name):
    body = {"model": model_name, "prompt": "a long answer please", "max_tokens": 2000, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        got = [line for _, line in zip(range(6), lines) if line.startswith("data:")]
        assert got
        assert _metric(server.url, "expertmesh_requests_running") == 1
    # the connection is closed: the request must be aborted long before its 2000 tokens are done
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (_metric(server.url, "expertmesh_requests_running") == 0
                and _metric(server.url, "expertmesh_kv_cache_blocks_used") == 0):
            break
        time.sleep(0.5)
    assert _metric(server.url, "expertmesh_requests_running") == 0
    assert _metric(server.url, "expertmesh_kv_cache_blocks_used") == 0
    assert _metric(server.url, "expertmesh_requests_cancelled_total") >= 1
    assert _metric(server.url, "expertmesh_generation_tokens_total") < 2000 + 200  # it did not run to the end
