"""LoRA adapters per request in the real server (`expertmesh serve`), in vLLM's spelling, driven by the official
`openai` client: `--lora-modules`, `--lora-dirs`, `--max-loras`, `--max-lora-rank`, `POST /v1/load_lora_adapter`
and `/v1/unload_lora_adapter`, `/v1/models` listing each adapter with its `parent`, and a request's `model`
picking one.

One server serves the tiny model with two adapters from the start, one made by peft on transformers' model of
the checkpoint and one by our own writer; greedy tokens must equal the offline `LLM(enable_lora=True)`'s, also
when adapters and the base model share steps. Bad loads and requests get their status and a message naming the
problem, and the server stays healthy after each. The last tests need no Ray: the runtime routes refused
without `--lora-dirs`, the flags' and settings' checks (refused before Ray starts), the printed Serve config,
and the reason a replica could not start.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema
from safetensors.torch import load_file, save_file

from expertmesh import LLM, LoRARequest, SamplingParams
from expertmesh.cli import main
from expertmesh.platform.server.lora import parse_lora_modules
from expertmesh.platform.server.runner import _replica_error
from expertmesh.platform.server.settings import ReplicaScaling, ServerSettings, check_runtime_lora
from tests.lora_adapters import make_peft_adapter, write_adapter
from tests.server.app_server import API_KEY as APP_KEY
from tests.server.app_server import running_app
from tests.server.cli_server import cli_server

pytest.importorskip("peft")

KEY = "serve-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The mixture of experts", "Routing sends each token to", "A"]
MAX_TOKENS = 12
LONG = 300  # tokens of the request an unload lets finish: seconds of decoding, so the unload comes mid-way


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Adapters inside the server's --lora-dirs (`allowed`), bad ones among them, and one outside it."""
    root = tmp_path_factory.mktemp("serve-lora")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir(), outside.mkdir()
    paths = {
        "peft": make_peft_adapter(Path(tiny_model_dir), "deepseek_v3", allowed / "peft", rank=8, seed=1),
        "ours": write_adapter(tiny_model_dir, allowed / "ours", rank=4),
        "third": write_adapter(tiny_model_dir, allowed / "third", rank=8, seed=2),
        "big": write_adapter(tiny_model_dir, allowed / "big", rank=32),
        "outside": write_adapter(tiny_model_dir, outside / "good", rank=4, seed=3),
    }
    good = paths["ours"]
    tensors = load_file(str(good / "adapter_model.safetensors"))
    for name, rewrite in {
        "alien": lambda k, v: (k.replace(".layers.1.", ".layers.41."), v),  # a layer the model does not have
        "misfit": lambda k, v: (k, v[:, :100].contiguous() if "layers.0.self_attn.o_proj.lora_A" in k else v),  # in 100
    }.items():
        out = allowed / name
        out.mkdir()
        (out / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file(dict(rewrite(k, v) for k, v in tensors.items()), str(out / "adapter_model.safetensors"))
        paths[name] = out
    (allowed / "empty").mkdir()  # no adapter files
    paths["empty"] = allowed / "empty"
    (allowed / "escape").symlink_to(paths["outside"], target_is_directory=True)  # inside by name only
    paths["escape"] = allowed / "escape"
    sneaky = allowed / "sneaky"  # its weights are a link out of the directory
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(paths["outside"] / "adapter_model.safetensors")
    paths["sneaky"] = sneaky
    paths["allowed"] = allowed
    return paths


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters, single_threaded_torch) -> dict[str | None, dict[str, str]]:
    """The offline engine's greedy text per adapter (None: the base model) and prompt, and for 'third' the
    LONG-token text of the first prompt under the key 'long'. Computed before the server starts, on one thread
    (two threads spinning against the server's would each run many times slower)."""
    names = ["peft", "ours", "third"]
    requests = {name: LoRARequest(name, i + 1, str(adapters[name])) for i, name in enumerate(names)}
    texts: dict[str | None, dict[str, str]] = {}
    with LLM(tiny_model_dir, enable_lora=True, max_loras=len(names)) as llm:
        for name in [None, *names]:
            lora = requests.get(name)
            outs = llm.generate(PROMPTS, _greedy(MAX_TOKENS), lora_request=lora)
            texts[name] = {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}
        long = llm.generate(PROMPTS[0], _greedy(LONG), lora_request=requests["third"])
        texts["third"]["long"] = long[0].outputs[0].text
    assert len({texts[n][PROMPTS[0]] for n in texts}) == len(texts), "each adapter should change the text"
    return texts


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, offline):
    ours = json.dumps({"name": "ours", "path": str(adapters["ours"]), "base_model_name": Path(tiny_model_dir).name})
    with cli_server(tiny_model_dir, "--lora-modules", f"peft={adapters['peft']}", ours,
                    "--lora-dirs", str(adapters["allowed"]), "--max-loras", "2", "--max-lora-rank", "16") as srv:
        yield srv
    assert srv.proc.returncode is not None and srv.stop_seconds < 60, srv.output()[-3000:]
    assert not srv.leftover, f"processes left behind: {srv.leftover}"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture
def base(tiny_model_dir) -> str:
    return Path(tiny_model_dir).name


def post(server, route: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url + route, json=body, headers=kwargs.pop("headers", AUTH), timeout=120, **kwargs)


def complete(server, model: str, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return post(server, "/v1/completions", {"model": model, "prompt": PROMPTS[0], "max_tokens": max_tokens,
                                            "temperature": 0, "ignore_eos": True})


def assert_error(response: httpx.Response, status: int, message: str, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]), error
    if code is not None:
        assert error["code"] == code


def assert_healthy(server, base: str, offline) -> None:
    """Ready, and the base model still gives its text."""
    assert httpx.get(server.url + "/health", timeout=30).json() == {"status": "ok"}
    r = complete(server, base)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline[None][PROMPTS[0]]


def running(server) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    return float(re.search(r"^expertmesh_requests_running ([0-9.]+)$", text, re.MULTILINE).group(1))


def wait_idle(server) -> None:
    deadline = time.monotonic() + 60
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(server) == 0


# -- the server ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_models_lists_each_adapter_with_its_parent(client, adapters, base):
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:3] == [base, "peft", "ours"]
    assert cards[base].parent is None
    for name in ("peft", "ours"):
        assert cards[name].parent == base
        assert cards[name].root == str(adapters[name].resolve())


@pytest.mark.slow
def test_adapters_and_base_model_served_together_give_offline_tokens(server, offline, base):
    """Every prompt for both adapters and the base model, whole and streamed, all at once: the steps mix
    rows of each adapter and of the base model."""
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(model: str, prompt: str, stream: bool) -> tuple[str, str, int]:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                            stream=stream, extra_body={"ignore_eos": True},
                                            **({"stream_options": {"include_usage": True}} if stream else {}))
        if not stream:
            return r.model, r.choices[0].text, r.usage.completion_tokens
        chunks = [c async for c in r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return chunks[0].model, text, chunks[-1].usage.completion_tokens

    jobs = [(model, prompt, stream) for model in ("peft", "ours", base) for prompt in PROMPTS
            for stream in (False, True)]

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(*job) for job in jobs))
        finally:
            await client.close()

    results = asyncio.run(asyncio.wait_for(all_of_them(), timeout=300))
    for (model, prompt, stream), (answered, text, tokens) in zip(jobs, results):
        want = offline[None if model == base else model][prompt]
        assert (answered, text, tokens) == (model, want, MAX_TOKENS), (model, prompt, stream)


@pytest.mark.slow
def test_chat_with_an_adapter_answers_under_its_name(client, offline):
    r = client.chat.completions.create(model="ours", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0)
    assert r.model == "ours" and r.usage.completion_tokens >= 1


@pytest.mark.slow
def test_load_and_unload_at_runtime(server, client, adapters, offline, base):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["third"])})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "third" and r.json()["parent"] == base and r.json()["loaded"] is True
    again = post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["third"])})
    assert again.status_code == 200 and again.json()["loaded"] is False  # the same name and path: nothing to do
    assert "third" in [m.id for m in client.models.list().data]
    assert complete(server, "third").json()["choices"][0]["text"] == offline["third"][PROMPTS[0]]

    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "third"})
    assert r.status_code == 200 and r.json() == {"id": "third", "object": "model", "deleted": True,
                                                 "running_requests": 0}
    assert "third" not in [m.id for m in client.models.list().data]
    assert_error(complete(server, "third"), 404, "model 'third' does not exist", "model_not_found")
    # the next load of the name is a new adapter: loaded and checked again
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["third"])})
    assert r.status_code == 200 and r.json()["loaded"] is True
    assert complete(server, "third").json()["choices"][0]["text"] == offline["third"][PROMPTS[0]]
    assert_healthy(server, base, offline)


@pytest.mark.slow
def test_unloading_an_adapter_in_use_lets_its_running_requests_finish(server, adapters, offline, base):
    post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["third"])})
    body = {"model": "third", "prompt": PROMPTS[0], "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", server.url + "/v1/completions", json=body,
                                                         headers=AUTH) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        events = [next(line for line in lines if line.startswith("data:"))]
        r = post(server, "/v1/unload_lora_adapter", {"lora_name": "third"})
        assert r.status_code == 200 and r.json()["running_requests"] == 1
        assert_error(complete(server, "third"), 404, "does not exist", "model_not_found")  # new ones: gone
        events += [line for line in lines if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[5:])["choices"][0]["text"] for e in events[:-1])
    assert text == offline["third"]["long"]  # it ran to its end with the adapter
    assert_healthy(server, base, offline)


@pytest.mark.slow
def test_a_request_finding_every_slot_pinned_gets_429_then_is_served(server, adapters, offline, base):
    """--max-loras 2: two streams, of 'peft' and 'ours', hold both slots; a third adapter must wait."""
    r = post(server, "/v1/load_lora_adapter", {"lora_name": "third", "lora_path": str(adapters["third"])})
    assert r.status_code == 200, r.text

    async def pin_both_then_ask_for_a_third():
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as http:
            streams, lines = [], []  # the line iterators stay referenced: one collected closes its stream
            try:
                for model in ("peft", "ours"):
                    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 1500, "temperature": 0,
                            "ignore_eos": True, "stream": True}
                    response = await http.send(http.build_request("POST", server.url + "/v1/completions", json=body),
                                                stream=True)
                    streams.append(response)
                    assert response.status_code == 200
                    lines.append(response.aiter_lines())
                    await anext(lines[-1])  # accepted: its adapter is pinned
                assert running(server) == 2
                body = {"model": "third", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0}
                busy = await http.post(server.url + "/v1/completions", json=body)
                another = await http.post(server.url + "/v1/load_lora_adapter",
                                          json={"lora_name": "fourth", "lora_path": str(adapters["third"])})
                return busy, another
            finally:
                for response in streams:
                    await response.aclose()

    busy, another = asyncio.run(pin_both_then_ask_for_a_third())
    for response in (busy, another):
        assert_error(response, 429, r"all max_loras=2 slots hold adapters of unfinished requests \('peft', 'ours'\)",
                     "adapter_slots_full")
        assert response.headers["retry-after"] == "1"
    wait_idle(server)  # the streams' requests were aborted when their clients left
    assert complete(server, "third").json()["choices"][0]["text"] == offline["third"][PROMPTS[0]]
    assert complete(server, "fourth").status_code == 404  # its load was refused: nothing of it stayed
    assert_healthy(server, base, offline)


BAD_LOADS = [  # (case, body, status, message naming the problem)
    ("rank above --max-lora-rank", {"lora_name": "big", "lora_path": "{big}"}, 400, "rank 32 exceeds max_lora_rank=16"),
    ("a layer the model lacks", {"lora_name": "alien", "lora_path": "{alien}"}, 400,
     r"model\.layers\.41\..*which this model does not have"),
    ("shapes that do not fit", {"lora_name": "misfit", "lora_path": "{misfit}"}, 400,
     r"o_proj: adapter shapes \(4, 100\), \(128, 4\) do not fit a 128 -> 128 layer"),
    ("outside --lora-dirs", {"lora_name": "out", "lora_path": "{outside}"}, 400,
     "resolves outside the directories adapters may be loaded from"),
    ("a symlink out of --lora-dirs", {"lora_name": "esc", "lora_path": "{escape}"}, 400,
     "resolves outside the directories"),
    ("a weights file linked out of --lora-dirs", {"lora_name": "sn", "lora_path": "{sneaky}"}, 400,
     "its adapter_model.safetensors links to a file there"),
    ("a directory that does not exist", {"lora_name": "gone", "lora_path": "{allowed}/gone"}, 400,
     "gone does not exist"),
    ("no adapter files", {"lora_name": "empty", "lora_path": "{empty}"}, 400, "is not a peft adapter"),
    ("a relative path", {"lora_name": "rel", "lora_path": "ours"}, 400, "lora_path must be an absolute path"),
    ("a name taken by another path", {"lora_name": "peft", "lora_path": "{ours}"}, 400,
     "a LoRA adapter named 'peft' is already loaded from .*peft; unload it first"),
    ("the base model's name", {"lora_name": "{base}", "lora_path": "{ours}"}, 400, "is the base model's name"),
    ("no lora_path", {"lora_name": "x"}, 400, "lora_path"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
def test_bad_loads_are_refused_naming_the_problem(server, adapters, offline, base, case, body, status, message):
    names = {k: str(v) for k, v in adapters.items()} | {"base": base}
    body = {k: v.format(**names) for k, v in body.items()}
    r = post(server, "/v1/load_lora_adapter", body)
    assert_error(r, status, message)
    if body["lora_name"] not in ("peft", base):
        assert_error(complete(server, body["lora_name"]), 404, "does not exist", "model_not_found")
    assert_healthy(server, base, offline)


@pytest.mark.slow
def test_unknown_models_and_keys(server, client, offline, base):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found" and "'peft', 'ours'" in e.value.message  # what it does serve
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "nope"}), 404,
                 "no LoRA adapter named 'nope' is loaded", "model_not_found")
    assert_error(post(server, "/v1/unload_lora_adapter", {"lora_name": base}), 404, "it is the base model")
    for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # behind the API key
        r = post(server, route, {"lora_name": "ours", "lora_path": "/x"}, headers={})
        assert r.status_code == 401
    assert "ours" in [m.id for m in client.models.list().data]
    assert_healthy(server, base, offline)


# -- no Ray: runtime loading off, parsing, settings -------------------------------------------------------------
def test_without_lora_dirs_only_the_lora_modules_are_served(tiny_model_dir, adapters, offline):
    model = Path(tiny_model_dir).name
    with running_app(tiny_model_dir, engine_kwargs={"enable_lora": True, "max_loras": 2},
                     lora_modules={"ours": str(adapters["ours"])}) as (url, _):
        auth = {"Authorization": f"Bearer {APP_KEY}"}
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            r = httpx.post(url + route, json={"lora_name": "ours", "lora_path": str(adapters["third"])}, headers=auth,
                           timeout=60)
            assert_error(r, 403, "at runtime is off on this server: start it with --lora-dirs",
                         "lora_runtime_updates_disabled")
        cards = httpx.get(url + "/v1/models", headers=auth, timeout=60).json()["data"]
        assert [(c["id"], c["parent"]) for c in cards] == [(model, None), ("ours", model)]
        r = httpx.post(url + "/v1/completions", headers=auth, timeout=60, json={
            "model": "ours", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
        assert r.json()["choices"][0]["text"] == offline["ours"][PROMPTS[0]]


def test_lora_modules_parse_vllms_two_forms():
    names = ("tiny", "/models/tiny")
    given = ["a=/x/a", json.dumps({"name": "b", "path": "/x/b", "base_model_name": "tiny"}), "c=/x/c=d"]
    assert parse_lora_modules(given, names) == {"a": "/x/a", "b": "/x/b", "c": "/x/c=d"}
    for texts, message in [
        (["a"], "'a' is not name=path"),
        (["a=/x", "a=/y"], "the name 'a' is given twice"),
        (["=/x"], "needs a non-empty name and path"),
        (['{"name": "a"}'], "must be a JSON object with 'name', 'path'"),
        (['{"name": "a", "path": "/x", "rank": 4}'], "must be a JSON object"),
        (['{"name": "a", "path": "/x", "base_model_name": "llama"}'], "is for base model 'llama'.*serves 'tiny'"),
        (["{nope"], "is not valid JSON"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_lora_modules(texts, names)


def test_lora_settings_are_checked(tmp_path):
    model = str(tmp_path / "tiny")
    with pytest.raises(ValueError, match="max_loras sizes the LoRA adapters' slots, but this server serves none"):
        ServerSettings(model=model, engine_kwargs={"max_loras": 4})
    with pytest.raises(ValueError, match="adapter name 'tiny' is the base model's name"):
        ServerSettings(model=model, lora_modules={"tiny": "/x"})
    with pytest.raises(ValueError, match="enable_lora is false, but lora_modules"):
        ServerSettings(model=model, engine_kwargs={"enable_lora": False}, lora_modules={"a": "/x"})
    settings = ServerSettings(model=model, lora_dirs=str(tmp_path))  # one directory, as a Serve config may say
    assert settings.lora_dirs == (str(tmp_path),) and settings.lora_enabled
    check_runtime_lora(settings, ReplicaScaling(replicas=1))
    with pytest.raises(ValueError, match="--lora-dirs turns on loading LoRA adapters at runtime.*up to 3 replicas"):
        check_runtime_lora(settings, ReplicaScaling(min_replicas=1, max_replicas=3))


def test_the_server_defaults_to_16_resident_adapters(tiny_model_dir):
    config = ServerSettings(model=str(tiny_model_dir), lora_modules={"a": "/x"}).engine_config()
    assert (config.enable_lora, config.max_loras, config.max_lora_rank) == (True, 16, 16)
    config = ServerSettings(model=str(tiny_model_dir), engine_kwargs={"enable_lora": True, "max_loras": 3})
    assert config.engine_config().max_loras == 3
    assert not ServerSettings(model=str(tiny_model_dir)).engine_config().enable_lora


def test_serve_refuses_bad_lora_flags_before_starting_ray(tiny_model_dir, adapters, capsys):
    model = ["serve", "--model", str(tiny_model_dir)]
    for flags, message in [
        (["--lora-modules", f"a={adapters['allowed']}/gone"], "lora_modules\\['a'\\] .*gone does not exist"),
        (["--lora-modules", f"a={adapters['outside']}", "--lora-dirs", str(adapters["allowed"])],
         "lora_modules\\['a'\\] .* resolves outside the directories adapters may be loaded from"),
        (["--lora-dirs", str(adapters["allowed"] / "gone")], "lora_dirs: .*gone is not a directory"),
        (["--lora-dirs", str(adapters["allowed"]), "--replicas", "2"],
         "reaches only the replica that takes the request"),
        (["--max-loras", "4"], "max_loras sizes the LoRA adapters' slots, but this server serves none"),
        (["--lora-modules", "a"], "'a' is not name=path"),
    ]:
        assert main([*model, *flags]) == 2
        assert re.search(message, capsys.readouterr().err), flags


def test_printed_serve_config_carries_the_adapters(tiny_model_dir, adapters):
    from expertmesh.platform.server.serve_app import app_builder

    out = subprocess.run([sys.executable, "-m", "expertmesh", "serve", "--model", str(tiny_model_dir), "--lora-modules",
                          f"ours={adapters['ours']}", "--lora-dirs", str(adapters["allowed"]), "--max-loras", "4",
                          "--print-serve-config"], capture_output=True, text=True, timeout=120, check=True).stdout
    config = yaml.safe_load(out)
    ServeDeploySchema.model_validate(config)
    args = config["applications"][0]["args"]
    assert args["lora_modules"] == {"ours": str(adapters["ours"])}
    assert args["lora_dirs"] == [str(adapters["allowed"].resolve())]
    assert args["engine_kwargs"] == {"max_loras": 4}
    settings = ServerSettings(**app_builder({**args, "api_keys": "k"})._bound_deployment.init_args[0])
    assert settings.engine_config().max_loras == 4 and settings.engine_config().enable_lora


def test_a_replica_that_cannot_start_says_why():
    status = ("The deployment failed to start 3 times in a row. ... Error:\nray::ServeReplica...\n"
              "RuntimeError: Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "ValueError: LoRA adapter 'big' (lora_int_id 1): /a/big: the adapter: rank 32 exceeds max_lora_rank=16")
    assert _replica_error(status) == ("ValueError: LoRA adapter 'big' (lora_int_id 1): /a/big: the adapter: rank 32 "
                                      "exceeds max_lora_rank=16")
    assert _replica_error("no traceback here") is None
