"""The offline API (`LLM.generate`, `chat`, `teacher_forced_logits`) and the `LLMEngine` loop beneath it,
on the random-weight tiny checkpoint.

Expected tokens are never hard-coded: every expectation is derived from a run of the same model
(each prompt alone, greedy, with an unconstrained engine), so the tests hold whatever the weights are.
"""

import json
import math

import pytest
import torch

from expertmesh import LLM, EngineConfig, LLMEngine, SamplingParams
from expertmesh.testing.init_model import ASSISTANT_TOKEN, BOS_TOKEN, USER_TOKEN

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

PROMPTS = [
    "Hello",
    "The mixture of experts",
    "a",
    "Once upon a time, in a land of sparse experts, a router sent every token to the two experts it trusted most.",
    "Paged attention stores keys and values in fixed-size blocks",
    "1 2 3 4 5",
    "Experts route tokens.",
    "Why?",
]
MAX_TOKENS = 12


def greedy(max_tokens=MAX_TOKENS, **kwargs):
    # ignore_eos keeps lengths exact; the tests that are about EOS say so.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=kwargs.pop("ignore_eos", True), **kwargs)


def token_ids(outputs):
    return [out.outputs[0].token_ids for out in outputs]


def assert_idle(llm):
    """Nothing queued, running or holding a KV block."""
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    blocks = engine.scheduler.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=tiny_model_dir)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def reference(llm):
    """Greedy MAX_TOKENS tokens of each prompt, run alone."""
    return {p: llm.generate(p, greedy())[0].outputs[0].token_ids for p in PROMPTS}


@pytest.fixture(scope="module")
def ending(reference, tok):
    """(prompt, its reference tokens, k, x): x = reference[k] is a plain (non-special, visible) token that
    first appears at k >= 2, so a request that ends on x stops after exactly k + 1 tokens."""
    special = set(tok.all_special_ids)
    prompt = PROMPTS[3]
    ref = reference[prompt]
    for k in range(2, len(ref)):
        x = ref[k]
        if x not in ref[:k] and x not in special and tok.decode([x]).strip():
            return prompt, ref, k, x
    pytest.fail(f"no usable ending token in {ref}")


# -- generate: shape of the outputs ---------------------------------------------------------------
def test_outputs_follow_input_order_when_requests_finish_at_different_steps(llm, tok, reference):
    lengths = [12, 3, 7, 1, 12, 5, 9, 2]
    outs = llm.generate(PROMPTS, [greedy(n) for n in lengths])
    assert len(outs) == len(PROMPTS)
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    for prompt, n, out in zip(PROMPTS, lengths, outs):
        completion = out.outputs[0]
        assert out.finished and out.prompt == prompt
        assert out.prompt_token_ids == tok.encode(prompt)
        assert completion.token_ids == reference[prompt][:n]  # generated ids only, exactly max_tokens
        assert (completion.finish_reason, completion.stop_reason) == ("length", None)
        assert completion.text == tok.decode(completion.token_ids)


def test_token_id_prompts_generate_like_text_prompts(llm, tok, reference):
    outs = llm.generate([{"prompt_token_ids": tok.encode(p)} for p in PROMPTS[:3]], greedy())
    assert token_ids(outs) == [reference[p] for p in PROMPTS[:3]]
    assert outs[0].prompt is None and outs[0].prompt_token_ids == tok.encode(PROMPTS[0])


def test_single_prompt_and_default_params_are_accepted(llm):
    out = llm.generate("Hello")  # vLLM defaults: temperature 1, max_tokens 16
    assert len(out) == 1 and 1 <= len(out[0].outputs[0].token_ids) <= 16


def test_greedy_is_deterministic_and_batch_invariant(llm, reference):
    assert token_ids(llm.generate(PROMPTS, greedy())) == [reference[p] for p in PROMPTS]
    assert token_ids(llm.generate(PROMPTS[::-1], greedy())) == [reference[p] for p in PROMPTS[::-1]]


@pytest.mark.parametrize("engine_kwargs", [
    pytest.param({"max_num_batched_tokens": 8}, id="chunked_prefill"),
    pytest.param({"max_num_seqs": 2}, id="two_seqs_at_a_time"),
    pytest.param({"block_size": 4}, id="block_size_4"),
])
def test_greedy_outputs_do_not_depend_on_engine_limits(tiny_model_dir, reference, engine_kwargs):
    llm = LLM(model=tiny_model_dir, **engine_kwargs)
    assert token_ids(llm.generate(PROMPTS, greedy())) == [reference[p] for p in PROMPTS]
    assert_idle(llm)


def test_preempted_requests_complete_with_the_same_tokens(tiny_model_dir, tok, reference):
    prompts = PROMPTS[:6]
    block_size = 4
    blocks = [math.ceil((len(tok.encode(p)) + MAX_TOKENS) / block_size) for p in prompts]
    num_blocks = 2 * max(blocks)  # room for the two longest requests, not for all six
    assert sum(blocks) > num_blocks
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), block_size=block_size, num_kv_blocks=num_blocks))
    seqs = [engine.add_request(f"r{i}", p, greedy()) for i, p in enumerate(prompts)]
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    assert [finished[f"r{i}"] for i in range(len(prompts))] == [reference[p] for p in prompts]
    assert sum(s.num_preemptions for s in seqs) > 0
    assert engine.scheduler.block_manager.num_free_blocks == num_blocks


def test_max_model_len_ends_a_request_with_length(tiny_model_dir, tok, reference):
    prompt = PROMPTS[1]
    room = 3
    llm = LLM(model=tiny_model_dir, max_model_len=len(tok.encode(prompt)) + room)
    completion = llm.generate(prompt, greedy(100))[0].outputs[0]
    assert (completion.token_ids, completion.finish_reason) == (reference[prompt][:room], "length")


# -- stopping --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eos_llm(tiny_model_dir, tmp_path_factory, ending):
    """The tiny model with its generation_config.json naming the ending token as EOS."""
    x = ending[3]
    model_dir = tmp_path_factory.mktemp("tiny_eos")
    for f in tiny_model_dir.iterdir():
        (model_dir / f.name).symlink_to(f)
    (model_dir / "generation_config.json").unlink()
    (model_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": x}))
    return LLM(model=model_dir)


def test_eos_from_generation_config_stops_and_is_left_out_of_text(eos_llm, tok, ending):
    prompt, ref, k, x = ending
    assert eos_llm.llm_engine.eos_token_ids == (x,)
    completion = eos_llm.generate(prompt, greedy(ignore_eos=False))[0].outputs[0]
    assert completion.token_ids == ref[: k + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", None)
    assert completion.text == tok.decode(ref[:k])
    assert eos_llm.generate(prompt, greedy(ignore_eos=True))[0].outputs[0].token_ids == ref


def test_default_eos_is_the_checkpoints(llm):
    assert llm.llm_engine.eos_token_ids == (1,)


def test_stop_token_ids_stop_with_the_id_as_stop_reason(llm, tok, ending):
    prompt, ref, k, x = ending
    completion = llm.generate(prompt, greedy(stop_token_ids=[x]))[0].outputs[0]
    assert completion.token_ids == ref[: k + 1]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", x)
    assert completion.text == tok.decode(ref[:k])
    kept = llm.generate(prompt, greedy(stop_token_ids=[x], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == tok.decode(ref[: k + 1])


@pytest.mark.parametrize("how", ["eos", "stop_token_ids"])
def test_min_tokens_bans_ending_tokens_until_reached(llm, eos_llm, ending, how):
    prompt, ref, k, x = ending
    target, params = (eos_llm, greedy(ignore_eos=False, min_tokens=k + 1)) if how == "eos" else (
        llm, greedy(stop_token_ids=[x], min_tokens=k + 1))
    got = target.generate(prompt, params)[0].outputs[0].token_ids
    assert got[:k] == ref[:k]
    assert x not in got[: k + 1] and len(got) > k + 1


@pytest.fixture(scope="module")
def stop_case(reference, tok):
    """(prompt, reference tokens, stop): a 3-char stop string spanning the first two tokens' boundary."""
    for prompt in PROMPTS:
        ref = reference[prompt]
        first, both = tok.decode(ref[:1]), tok.decode(ref[:2])
        if len(first) >= 3 and len(both) > len(first) and both.isascii() and both.isprintable():
            return prompt, ref, both[len(first) - 2 : len(first) + 1]
    pytest.fail("no prompt whose first two tokens decode to plain text")


def test_stop_string_truncates_text_before_it(llm, tok, stop_case):
    prompt, ref, stop = stop_case
    full = tok.decode(ref)
    completion = llm.generate(prompt, greedy(stop=["never-generated", stop]))[0].outputs[0]
    assert completion.token_ids == ref[:2]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    assert completion.text == full[: full.index(stop)]


def test_include_stop_str_in_output_keeps_the_stop_string(llm, tok, stop_case):
    prompt, ref, stop = stop_case
    full = tok.decode(ref)
    completion = llm.generate(prompt, greedy(stop=stop, include_stop_str_in_output=True))[0].outputs[0]
    assert completion.text == full[: full.index(stop) + len(stop)]
    assert completion.stop_reason == stop


def test_stop_string_is_ignored_until_min_tokens(llm, stop_case):
    prompt, ref, stop = stop_case
    completion = llm.generate(prompt, greedy(stop=stop, min_tokens=2))[0].outputs[0]
    assert completion.token_ids[:2] == ref[:2] and len(completion.token_ids) > 2


# -- sampling ----------------------------------------------------------------------------------------
def sampled(seed, **kwargs):
    top_k = kwargs.pop("top_k", 0)
    return SamplingParams(temperature=1.0, top_k=top_k, seed=seed, max_tokens=10, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("top_k", [0, 20])
def test_seeded_sampling_does_not_depend_on_the_batch(llm, top_k):
    alone = llm.generate(PROMPTS[0], sampled(123, top_k=top_k))[0].outputs[0].token_ids
    again = llm.generate(PROMPTS[0], sampled(123, top_k=top_k))[0].outputs[0].token_ids
    batch = llm.generate(
        [PROMPTS[3], PROMPTS[0], PROMPTS[1], PROMPTS[0]],
        [SamplingParams(temperature=0.7, max_tokens=4), sampled(123, top_k=top_k), sampled(7), greedy()],
    )
    assert again == alone
    assert batch[1].outputs[0].token_ids == alone


def test_different_seeds_sample_different_tokens(llm):
    a, b = token_ids(llm.generate([PROMPTS[0]] * 2, [sampled(1), sampled(2)]))
    assert a != b


@pytest.mark.parametrize("params", [
    pytest.param(greedy(6, logprobs=3), id="greedy_top3"),
    pytest.param(sampled(5, logprobs=2), id="seeded_top2"),
    pytest.param(sampled(9, logprobs=0), id="sampled_only"),
])
def test_logprobs_are_the_teacher_forced_distribution(llm, tok, params):
    prompt_ids = tok.encode(PROMPTS[4])
    completion = llm.generate({"prompt_token_ids": prompt_ids}, params)[0].outputs[0]
    ids = completion.token_ids
    assert len(completion.logprobs) == len(ids)
    logits = llm.teacher_forced_logits([prompt_ids], [ids])[0]  # [P + C, V]
    P = len(prompt_ids)
    for j, (token, entry) in enumerate(zip(ids, completion.logprobs)):
        assert token in entry and len(entry) in (params.logprobs, params.logprobs + 1)
        assert all(v <= 0 for v in entry.values())
        expected = torch.log_softmax(logits[P - 1 + j], dim=-1)  # row P-1+j predicts output token j
        assert entry[token] == pytest.approx(expected[token].item(), abs=1e-4)
        top = sorted(entry.values(), reverse=True)[: params.logprobs]
        assert top == pytest.approx(expected.topk(params.logprobs).values.tolist(), abs=1e-4)
    assert completion.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(ids, completion.logprobs)))
    if params.greedy:
        assert all(entry[t] == max(entry.values()) for t, entry in zip(ids, completion.logprobs))


def test_no_logprobs_unless_asked(llm):
    completion = llm.generate(PROMPTS[0], greedy(2))[0].outputs[0]
    assert completion.logprobs is None and completion.cumulative_logprob is None


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    ({"prompt_token_ids": []}, ValueError, r"prompts\[1\] is empty"),
    ({"prompt_token_ids": [5, 2048]}, ValueError, r"prompts\[1\].*outside the vocabulary \[0, 2048\).*2048"),
    ({"prompt_token_ids": [-1]}, ValueError, r"prompts\[1\].*outside the vocabulary.*-1"),
    ({"prompt_token_ids": [5] * 2048}, ValueError, r"prompts\[1\].*2048 tokens.*max_model_len=2048"),
    (42, TypeError, r"prompts\[1\] must be a string or a dict.*got int"),
    ({"prompt": "hi"}, TypeError, r"prompts\[1\] must be a string or a dict with 'prompt_token_ids'"),
    ({"prompt_token_ids": "abc"}, TypeError, r"prompts\[1\].prompt_token_ids must be a list of ints"),
])
def test_bad_prompt_rejects_the_call_and_leaves_nothing_behind(llm, reference, bad, error, match):
    with pytest.raises(error, match=match):
        llm.generate([PROMPTS[0], bad, PROMPTS[1]], greedy())
    assert_idle(llm)
    assert token_ids(llm.generate(PROMPTS[:2], greedy())) == [reference[p] for p in PROMPTS[:2]]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0), ("min_tokens", 20),
    ("logprobs", 21), ("n", 2), ("stop", [""]), ("stop_token_ids", [-1]), ("seed", "7"), ("ignore_eos", 1),
])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("params, error, match", [
    ([greedy(), greedy()], ValueError, r"2 sampling params for 3 prompts"),
    ([greedy(), {"temperature": 0}, greedy()], TypeError, r"sampling_params\[1\] must be SamplingParams"),
    ([greedy(), greedy(stop_token_ids=[2048], min_tokens=2), greedy()], ValueError, r"stop_token_ids.*2048"),
])
def test_bad_sampling_params_reject_the_call(llm, reference, params, error, match):
    with pytest.raises(error, match=match):
        llm.generate(PROMPTS[:3], params)
    assert_idle(llm)
    assert token_ids(llm.generate(PROMPTS[:1], greedy())) == [reference[PROMPTS[0]]]


def test_request_larger_than_the_cache_is_rejected(tiny_model_dir, reference):
    llm = LLM(model=tiny_model_dir, block_size=4, num_kv_blocks=6)  # 24 tokens of cache
    with pytest.raises(ValueError, match=r"need 8 KV blocks.*num_blocks 6"):
        llm.generate([PROMPTS[0], {"prompt_token_ids": [5] * 5}], [greedy(2), greedy(27)])  # 5 + 27 = 32 tokens
    assert_idle(llm)
    assert token_ids(llm.generate(PROMPTS[0], greedy())) == [reference[PROMPTS[0]]]


@pytest.mark.parametrize("kwargs, match", [
    ({"max_num_seqs": 0}, "max_num_seqs"), ({"block_size": True}, "block_size"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"), ({"max_model_len": 0}, "max_model_len"),
    ({"kv_cache_gib": 0}, "kv_cache_gib"),
])
def test_invalid_engine_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="unused", **kwargs)


def test_max_model_len_above_the_models_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match=r"max_model_len=4096 exceeds.*max_position_embeddings=2048"):
        LLM(model=tiny_model_dir, max_model_len=4096)


# -- the engine API ------------------------------------------------------------------------------------
def test_abort_request_drops_it_and_frees_its_blocks(llm, reference):
    engine = llm.llm_engine
    aborted = engine.add_request("gone", PROMPTS[3], greedy())
    engine.add_request("kept", PROMPTS[0], greedy())
    with pytest.raises(ValueError, match="'kept' is already in use"):
        engine.add_request("kept", PROMPTS[1], greedy())
    engine.step()
    engine.step()
    engine.abort_request("gone")
    engine.abort_request("never-added")  # unknown ids are ignored, as in vLLM
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"kept"}
    assert outputs[-1].outputs[0].token_ids == reference[PROMPTS[0]]
    assert aborted.finish_reason == "abort"
    assert_idle(llm)


# -- chat ------------------------------------------------------------------------------------------------
def test_chat_equals_generate_on_the_hand_templated_prompt(llm, tok):
    messages = [{"role": "user", "content": "hi"}]
    got = llm.chat(messages, greedy())
    text = f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}"
    ids = tok.encode(text, add_special_tokens=False)
    assert got[0].prompt_token_ids == ids and ids.count(tok.bos_token_id) == 1  # BOS written once
    assert token_ids(got) == token_ids(llm.generate({"prompt_token_ids": ids}, greedy()))


def test_chat_takes_a_list_of_conversations(llm):
    conversations = [[{"role": "user", "content": "hi"}], [{"role": "system", "content": "Be brief."},
                                                           {"role": "user", "content": "Why?"}]]
    outs = llm.chat(conversations, greedy(3))
    assert token_ids(outs) == [token_ids(llm.chat(c, greedy(3)))[0] for c in conversations]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user"}], r"messages\[0\]\.content must be a string, got missing"),
    ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}], r"messages\[1\]\.role must be a string"),
    ([], "non-empty list"),
    ({"role": "user", "content": "hi"}, "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "unsupported role tool"),
])
def test_bad_chat_messages_name_the_field(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, greedy(2))
    assert_idle(llm)


# -- teacher_forced_logits ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forced_inputs(tok, reference):
    prompts = [tok.encode(PROMPTS[3]), tok.encode(PROMPTS[0])]
    return prompts, [reference[PROMPTS[3]][:5], []]


@pytest.fixture(scope="module")
def forced_logits(llm, forced_inputs):
    return llm.teacher_forced_logits(*forced_inputs)


def test_teacher_forced_logits_have_a_row_per_position(llm, forced_inputs, forced_logits, reference):
    (long_ids, short_ids), (cont, _) = forced_inputs
    vocab = llm.llm_engine.model_config.vocab_size
    assert [x.shape for x in forced_logits] == [(len(long_ids) + 5, vocab), (len(short_ids), vocab)]
    assert all(x.dtype == torch.float32 for x in forced_logits)
    # Row P-1+j predicts generated token j: greedy decoding reads these same rows.
    predicted = forced_logits[0][len(long_ids) - 1 :].argmax(-1).tolist()
    assert predicted == reference[PROMPTS[3]][:6]
    assert_idle(llm)


@pytest.mark.parametrize("engine_kwargs", [
    pytest.param({"max_num_batched_tokens": 4}, id="chunked"), pytest.param({"block_size": 4}, id="block_size_4"),
])
def test_teacher_forced_logits_do_not_depend_on_engine_limits(
    tiny_model_dir, forced_inputs, forced_logits, engine_kwargs
):
    got = LLM(model=tiny_model_dir, **engine_kwargs).teacher_forced_logits(*forced_inputs)
    for a, b in zip(got, forced_logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("conts, match", [
    ([[5], [2048]], r"continuation_token_ids\[1\].*outside the vocabulary"),
    ([[5]], "one list per prompt"),
    ([[5], [5] * 2048], r"exceeds max_model_len"),
])
def test_teacher_forced_logits_errors_leave_nothing_behind(llm, tok, reference, conts, match):
    with pytest.raises(ValueError, match=match):
        llm.teacher_forced_logits([tok.encode("a"), tok.encode("b")], conts)
    assert_idle(llm)
    assert token_ids(llm.generate(PROMPTS[0], greedy())) == [reference[PROMPTS[0]]]


def test_text_prompt_without_a_tokenizer_and_a_small_vocabulary_says_what_to_do(tmp_path):
    from tests.hf_models import build_hf_checkpoint

    ckpt = build_hf_checkpoint("mixtral", tmp_path / "m")  # transformers writes no tokenizer; vocab 211 < 258
    llm = LLM(str(ckpt), num_kv_blocks=8)
    with pytest.raises(ValueError, match=r"no tokenizer\.json.*prompt_token_ids"):
        llm.generate("hi", SamplingParams(max_tokens=2))
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 2


def test_a_request_refused_by_the_sampler_leaves_the_engine_clean(tiny_model_dir, monkeypatch):
    """A request refused after validation (here: the generator cannot be built) must not stay half-added:
    the next requests run normally."""
    from expertmesh.engine import llm_engine

    llm = LLM(tiny_model_dir)
    engine = llm.llm_engine

    def broken(seed, device):
        raise ValueError("seed out of range for this device")

    monkeypatch.setattr(llm_engine, "make_generator", broken)
    with pytest.raises(ValueError, match="seed out of range"):
        engine.add_request("bad", "hello", SamplingParams(seed=1))
    monkeypatch.undo()
    assert not engine.has_unfinished_requests()
    out = llm.generate("hello", SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4
