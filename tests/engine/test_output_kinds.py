"""What each output of a request carries: the whole output so far (CUMULATIVE), only what is new (DELTA), or
one output at the end (FINAL_ONLY). The deltas of a request must add up to its cumulative output, and text
that a stop string later removes must never be handed out."""

import pytest

from expertmesh import EngineConfig, LLMEngine, RequestOutputKind, SamplingParams

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), max_num_seqs=8))


def _run(engine, prompts, params):
    """Every output of every request, in order, per request id."""
    got = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
        got[f"r{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id].append(out)
    return got


PROMPTS = ["The mixture of experts", "a", "Paged attention stores keys", "1 2 3"]


@pytest.mark.parametrize("logprobs", [None, 3])
def test_deltas_add_up_to_the_cumulative_output(engine, logprobs):
    base = dict(temperature=0.8, seed=7, max_tokens=40, ignore_eos=True, logprobs=logprobs)
    cumulative = _run(engine, PROMPTS, SamplingParams(**base))
    deltas = _run(engine, PROMPTS, SamplingParams(**base, output_kind=RequestOutputKind.DELTA))
    for rid, outs in cumulative.items():
        final = outs[-1].outputs[0]
        # one delta per step, each with the one new token (none is repeated or skipped)
        assert [len(o.outputs[0].token_ids) for o in deltas[rid]] == [1] * len(final.token_ids)
        total = deltas[rid][0]
        for later in deltas[rid][1:]:
            total.add(later)
        got = total.outputs[0]
        assert total.finished and got.finish_reason == final.finish_reason == "length"
        assert got.token_ids == final.token_ids and got.text == final.text
        assert got.logprobs == final.logprobs
        if logprobs is not None:
            assert got.cumulative_logprob == pytest.approx(final.cumulative_logprob)


def test_a_delta_never_hands_out_text_a_stop_string_removes(engine):
    # stop strings taken from the model's own greedy text, so they match somewhere in the middle
    greedy = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    free = _run(engine, PROMPTS, SamplingParams(**greedy))
    for rid, outs in free.items():
        text = outs[-1].outputs[0].text
        if len(text) < 12:
            continue
        stop = text[6:11]
        params = dict(greedy, stop=[stop, "a very long stop string that never matches"])
        (cut,) = _run(engine, [PROMPTS[int(rid[1:])]], SamplingParams(**params)).values()
        (parts,) = _run(engine, [PROMPTS[int(rid[1:])]],
                        SamplingParams(**params, output_kind=RequestOutputKind.DELTA)).values()
        expected = cut[-1].outputs[0].text
        assert cut[-1].outputs[0].finish_reason == "stop" and stop not in expected
        sent = ""
        for part in parts:
            sent += part.outputs[0].text
            assert expected.startswith(sent)  # nothing handed out is ever taken back
        assert sent == expected and parts[-1].outputs[0].finish_reason == "stop"


def test_final_only_gives_one_output_equal_to_the_last_cumulative_one(engine):
    params = dict(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=2)
    cumulative = _run(engine, PROMPTS, SamplingParams(**params))
    final = _run(engine, PROMPTS, SamplingParams(**params, output_kind=RequestOutputKind.FINAL_ONLY))
    for rid, outs in final.items():
        assert len(outs) == 1 and outs[0].finished
        assert outs[0].outputs[0] == cumulative[rid][-1].outputs[0]


def test_output_kind_must_be_a_kind():
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")
