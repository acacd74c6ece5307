"""Offline inference with LoRA adapters in vLLM's spelling: `LLM(..., enable_lora=True, max_loras=N)` and
`generate(..., lora_request=LoRARequest(name, id, path))`, one request for every prompt or one per prompt.

Adapters made by peft on transformers' model give transformers + peft's greedy tokens; a batch mixing
adapters and the base model gives each prompt the tokens it gets alone; an adapter we write on a few experts
per layer gives the tokens of the training-side modules (`load_peft_adapter`); bad adapters and requests are
refused with a ValueError naming the problem, and the engine keeps serving. The adapters registry (which
adapter holds which slot) is pure Python and tested on its own at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertmesh import LLM, LoRARequest, SamplingParams
from expertmesh.engine.adapter_registry import AdapterRegistry
from expertmesh.engine.executor import LocalExecutor
from expertmesh.model import AttentionMetadata, load_model
from expertmesh.model.lora import apply_lora
from expertmesh.model.peft_format import load_peft_adapter, save_peft_adapter
from tests.hf_models import RouterProbe, build_hf_checkpoint, load_reference, make_prompts, reference_greedy
from tests.lora_adapters import make_peft_adapter, write_adapter

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("single_threaded_torch")

FAMILIES = ["deepseek_v3", "mixtral"]
PEFT_FAMILIES = [*FAMILIES, "qwen2_moe"]  # Qwen2-MoE: peft names its shared expert in the singular
# Prompt seeds, 3 unless seed 3 gave a reference a near-tie (the asserts in `case` find them).
PROMPT_SEEDS = {"qwen2_moe": 9}
PROMPT_LENS = [5, 19, 9, 30]
MAX_TOKENS = 10
ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=512, block_size=16)
# As in tests/model/test_parity.py: exact token checks only mean something when the reference is decisive.
MIN_TOKEN_MARGIN, MIN_ROUTER_GAP = 1e-4, 2e-5


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def generate_ids(llm: LLM, prompts: list[list[int]], lora_request=None, max_tokens: int = MAX_TOKENS):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens), lora_request=lora_request)
    return [list(out.outputs[0].token_ids) for out in outs]


def assert_idle(llm: LLM) -> None:
    """Nothing queued or holding a KV block, and no adapter pinned by a request."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    blocks = engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    assert engine.adapters is None or engine.adapters.pinned() == {}


@dataclass(frozen=True, kw_only=True, slots=True)
class Case:
    family: str
    ckpt: Path
    prompts: list[list[int]]
    adapters: list[LoRARequest]  # two peft adapters of different ranks
    base_tokens: list[list[int]]  # transformers' greedy tokens per prompt, without an adapter
    tokens: list[list[list[int]]]  # transformers + peft's greedy tokens per adapter, per prompt


@pytest.fixture(scope="module", params=PEFT_FAMILIES)
def case(request, tmp_path_factory) -> Case:
    family = request.param
    root = tmp_path_factory.mktemp(f"lora-{family}")
    ckpt = build_hf_checkpoint(family, root / "model")
    adapters = [
        LoRARequest("first", 1, str(make_peft_adapter(ckpt, family, root / "first", rank=4, seed=1))),
        LoRARequest("second", 2, str(make_peft_adapter(ckpt, family, root / "second", rank=8, seed=2))),
    ]
    prompts = make_prompts(load_reference(ckpt).config.vocab_size, PROMPT_LENS, seed=PROMPT_SEEDS.get(family, 3))
    references = [load_reference(ckpt)]
    references += [peft.PeftModel.from_pretrained(load_reference(ckpt), a.lora_path).eval() for a in adapters]
    results = []
    for model in references:
        probe = RouterProbe(model)
        greedy_runs = [reference_greedy(model, p, MAX_TOKENS) for p in prompts]
        probe.close()
        margin = min(m for _, m in greedy_runs)
        assert margin >= MIN_TOKEN_MARGIN, f"greedy top-1/top-2 gap {margin:.2e}: pick other seeds"
        assert probe.min_gap >= MIN_ROUTER_GAP, f"router selection gap {probe.min_gap:.2e}: pick other seeds"
        results.append([tokens for tokens, _ in greedy_runs])
    return Case(family=family, ckpt=ckpt, prompts=prompts, adapters=adapters, base_tokens=results[0],
                tokens=results[1:])


# -- (a) adapters made by peft: transformers + peft's tokens ----------------------------------------------------
def test_adapter_made_by_peft_gives_transformers_peft_tokens(case):
    llm = LLM(model=str(case.ckpt), enable_lora=True, max_loras=2, max_lora_rank=8, **ENGINE)
    for adapter, want in zip(case.adapters, case.tokens):
        got = generate_ids(llm, case.prompts, lora_request=adapter)
        assert got == want, f"{case.family}, adapter {adapter.lora_name}"
        assert all(g != b for g, b in zip(got, case.base_tokens)), "the adapter should change every prompt's tokens"
    assert generate_ids(llm, case.prompts) == case.base_tokens  # no lora_request: the base model
    assert_idle(llm)


# -- (b) many adapters in one batch -----------------------------------------------------------------------------
def test_mixed_adapters_in_one_call_give_each_prompt_its_tokens_alone(case):
    """A 16-token budget splits the prompts into prefill chunks that share steps with other sequences' decodes,
    so a step holds rows of both adapters and of the base model."""
    first, second = case.adapters
    llm = LLM(model=str(case.ckpt), enable_lora=True, max_loras=2, max_lora_rank=8,
              **{**ENGINE, "max_num_batched_tokens": 16})
    requests = [first, second, None, first]
    mixed = generate_ids(llm, case.prompts, lora_request=requests)
    alone = [generate_ids(llm, [p], lora_request=r)[0] for p, r in zip(case.prompts, requests)]
    assert mixed == alone
    want = [case.tokens[0][0], case.tokens[1][1], case.base_tokens[2], case.tokens[0][3]]
    assert mixed == want  # and each is transformers + peft's
    outs = llm.generate([{"prompt_token_ids": p} for p in case.prompts[:2]], greedy(2), lora_request=[first, None])
    assert outs[0].lora_request == first and outs[1].lora_request is None  # as vLLM's RequestOutput says
    assert_idle(llm)


# -- (c) our own adapter on a few experts per layer: the training-side modules' tokens ---------------------------
@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens recomputing the whole sequence each step (no KV cache), and the smallest relative
    top-1/top-2 logit gap seen."""
    ids, margin = list(prompt), float("inf")
    for _ in range(max_tokens):
        meta = AttentionMetadata.without_cache([len(ids)])
        logits = model(torch.tensor(ids), meta, None, torch.tensor([len(ids) - 1]))[0]  # [V]
        top2 = logits.topk(2).values
        margin = min(margin, float((top2[0] - top2[1]) / max(1.0, float(logits.abs().max()))))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], margin


@pytest.mark.parametrize("family", FAMILIES)
def test_our_adapter_on_a_few_experts_gives_the_training_modules_tokens(tmp_path, family):
    ckpt = build_hf_checkpoint(family, tmp_path / "model")
    ours = load_model(ckpt)
    moe_layers = [i for i, layer in enumerate(ours.model.layers) if hasattr(layer.mlp, "gate")]
    chosen = {layer: [1, 4 + j] for j, layer in enumerate(moe_layers)}  # a few experts, not the same per layer
    trainable = apply_lora(ours, rank=4, alpha=8, targets=("attention", "shared_experts", "routed_experts"),
                           experts=chosen)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainable.values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    adapter = save_peft_adapter(ours, tmp_path / "adapter", rank=4, alpha=8, base_model=str(ckpt))

    reference = load_model(ckpt)
    load_peft_adapter(reference, adapter)  # LoraLinear and ExpertLora, as training runs them
    prompts = make_prompts(ours.config.vocab_size, PROMPT_LENS, seed=4)
    runs = [greedy_without_cache(reference, p, MAX_TOKENS) for p in prompts]
    assert min(m for _, m in runs) >= MIN_TOKEN_MARGIN

    llm = LLM(model=str(ckpt), enable_lora=True, **ENGINE)  # vLLM's defaults: one slot of rank up to 16
    got = generate_ids(llm, prompts, lora_request=LoRARequest("ours", 7, str(adapter)))
    assert got == [tokens for tokens, _ in runs]
    assert got != generate_ids(llm, prompts)
    # Only the adapted (slot, expert) pairs hold expert weights: two per MoE layer.
    model_adapters = llm.llm_engine.executor.adapters
    assert {path: ea.num_rows for path, ea in model_adapters.experts.items()} == {
        f"model.layers.{i}.mlp": 2 for i in moe_layers}
    assert_idle(llm)


# -- (d) bad input ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-adapters")
    good = write_adapter(tiny_model_dir, root / "good", rank=4)
    other = write_adapter(tiny_model_dir, root / "other", rank=4, seed=1)
    big = write_adapter(tiny_model_dir, root / "big", rank=32)
    alien = root / "alien"  # names a layer the model does not have
    alien.mkdir()
    (alien / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    tensors = {k.replace(".layers.1.", ".layers.41."): v
               for k, v in load_file(str(good / "adapter_model.safetensors")).items()}
    save_file(tensors, str(alien / "adapter_model.safetensors"))
    return {"good": good, "other": other, "big": big, "alien": alien}


PROMPTS = [{"prompt_token_ids": [5, 17, 300, 42, 9]}, {"prompt_token_ids": [1, 2, 3]}]


def test_bad_adapters_and_requests_are_refused_and_the_engine_keeps_serving(tiny_model_dir, tiny_adapters):
    llm = LLM(model=str(tiny_model_dir), enable_lora=True, max_loras=2, max_lora_rank=16)
    good = LoRARequest("good", 1, str(tiny_adapters["good"]))
    want = llm.generate(PROMPTS, greedy(), lora_request=good)
    base = llm.generate(PROMPTS, greedy())
    assert [o.outputs[0].token_ids for o in want] != [o.outputs[0].token_ids for o in base]

    bad = [
        (LoRARequest("big", 2, str(tiny_adapters["big"])), r"rank 32 exceeds max_lora_rank=16"),
        (LoRARequest("alien", 3, str(tiny_adapters["alien"])), r"model\.layers\.41\..*which this model does not have"),
        (LoRARequest("gone", 4, str(tiny_adapters["good"].parent / "missing")), r"missing.*does not exist"),
        (LoRARequest("impostor", 1, str(tiny_adapters["other"])), r"lora_int_id 1"),  # id 1 is 'good'
    ]
    for request, message in bad:
        with pytest.raises(ValueError, match=message):
            llm.generate(PROMPTS, greedy(), lora_request=[good, request])
        assert_idle(llm)
        again = llm.generate(PROMPTS, greedy(), lora_request=good)
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]

    with pytest.raises(ValueError, match="2 lora requests for 3 prompts"):
        llm.generate(PROMPTS + PROMPTS[:1], greedy(), lora_request=[good, None])
    with pytest.raises(TypeError, match=r"lora_request\[1\] must be a LoRARequest or None"):
        llm.generate(PROMPTS, greedy(), lora_request=[good, "good"])
    assert_idle(llm)


def test_lora_request_without_enable_lora_is_refused(tiny_model_dir, tiny_adapters):
    llm = LLM(model=str(tiny_model_dir))
    base = llm.generate(PROMPTS, greedy())
    with pytest.raises(ValueError, match="LoRA is not enabled.*enable_lora=True"):
        llm.generate(PROMPTS, greedy(), lora_request=LoRARequest("good", 1, str(tiny_adapters["good"])))
    assert_idle(llm)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy())] == [o.outputs[0].token_ids for o in base]
    assert llm.generate(PROMPTS, greedy(), lora_request=[None, None])  # no adapter named: nothing to refuse


def test_more_adapters_than_slots_evicts_the_least_recently_used(tiny_model_dir, tiny_adapters):
    llm = LLM(model=str(tiny_model_dir), enable_lora=True)  # max_loras=1, as vLLM
    good = LoRARequest("good", 1, str(tiny_adapters["good"]))
    other = LoRARequest("other", 2, str(tiny_adapters["other"]))
    first = generate_ids(llm, [p["prompt_token_ids"] for p in PROMPTS], lora_request=good)
    second = generate_ids(llm, [p["prompt_token_ids"] for p in PROMPTS], lora_request=other)  # evicts 'good'
    assert first != second
    assert generate_ids(llm, [p["prompt_token_ids"] for p in PROMPTS], lora_request=good) == first  # reloaded
    with pytest.raises(ValueError, match=r"max_loras=1.*'good'"):  # both are needed at once: one slot
        llm.generate(PROMPTS, greedy(), lora_request=[good, other])
    assert_idle(llm)


def test_an_executor_that_cannot_serve_adapters_is_refused(tiny_model_dir):
    class PlainExecutor:  # the Executor protocol, without adapters
        def __init__(self, spec):
            self.inner = LocalExecutor.build(spec)
            self.device, self.mode = self.inner.device, "plain"
            self.placement, self.recoveries = self.inner.placement, []
            self.stopped = False

        def execute(self, batch, *, all_logits=False):
            return self.inner.execute(batch, all_logits=all_logits)

        def load_counts(self, window=False):
            return self.inner.load_counts(window)

        def health(self):
            return []

        def shutdown(self):
            self.stopped = True

    made = []
    with pytest.raises(ValueError, match="plain executor cannot serve LoRA adapters"):
        LLM(model=str(tiny_model_dir), enable_lora=True, executor=lambda spec: made.append(PlainExecutor(spec))
            or made[-1])
    assert made[0].stopped  # what was built is stopped, not leaked
    LLM(model=str(tiny_model_dir), executor=PlainExecutor).generate(PROMPTS, greedy(2))  # without LoRA: fine


def test_engine_settings_are_checked():
    with pytest.raises(ValueError, match="max_loras must be a positive integer"):
        LLM(model="unused", enable_lora=True, max_loras=0)
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        LLM(model="unused", enable_lora=True, max_lora_rank=-1)


def test_lora_request_fields_are_vllms():
    request = LoRARequest(lora_name="a", lora_int_id=3, lora_path="/x")
    assert (request.lora_name, request.lora_int_id, request.lora_path) == ("a", 3, "/x")
    assert LoRARequest("a", 3, lora_local_path="/y").lora_path == "/y"  # vLLM's deprecated alias
    with pytest.raises(ValueError, match="lora_int_id must be a positive integer"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_path"):
        LoRARequest("a", 1)


# -- the adapters registry (pure Python) --------------------------------------------------------------------------
def req(i: int, path: str | None = None) -> LoRARequest:
    return LoRARequest(f"a{i}", i, path or f"/adapters/{i}")


def test_registry_loads_once_and_evicts_the_least_recently_used_unpinned_adapter():
    loads: list[tuple[int, int]] = []
    reg = AdapterRegistry(2)
    load = lambda i: lambda slot: loads.append((i, slot))  # noqa: E731
    assert reg.acquire(req(1), load(1)) == 0
    assert reg.acquire(req(2), load(2)) == 1
    assert reg.acquire(req(1), load(1)) == 0  # resident: not loaded again
    assert loads == [(1, 0), (2, 1)]
    reg.release(1), reg.release(1), reg.release(2)
    reg.acquire(req(1), load(1)), reg.release(1)  # 1 is now the most recently used
    assert reg.acquire(req(3), load(3)) == 1  # evicts 2, the least recently used
    assert loads[-1] == (3, 1) and reg.resident() == {1: 0, 3: 1}


def test_registry_never_evicts_a_pinned_adapter():
    reg = AdapterRegistry(1)
    reg.acquire(req(1), lambda slot: None)
    with pytest.raises(ValueError, match=r"max_loras=1 slots hold adapters of unfinished requests \('a1'\)"):
        reg.acquire(req(2), lambda slot: pytest.fail("must not load over a pinned adapter"))
    assert reg.pinned() == {1: 1}
    reg.release(1)
    assert reg.acquire(req(2), lambda slot: None) == 0


def test_registry_forgets_a_slot_whose_load_failed():
    reg = AdapterRegistry(1)
    reg.acquire(req(1), lambda slot: None)
    reg.release(1)

    def fail(slot):
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        reg.acquire(req(2), fail)
    assert reg.resident() == {} and reg.pinned() == {}  # the slot's content is unknown: 1 is loaded again
    loaded = []
    assert reg.acquire(req(1), loaded.append) == 0 and loaded == [0]


def test_registry_refuses_one_id_for_two_adapters():
    reg = AdapterRegistry(2)
    reg.acquire(req(1), lambda slot: None)
    with pytest.raises(ValueError, match=r"lora_int_id 1 .*'a1' at /adapters/1.*/elsewhere"):
        reg.acquire(req(1, "/elsewhere"), lambda slot: None)
