"""expertmesh against transformers on tiny random checkpoints of every MoE family and config option.

Logits: teacher forcing through the paged cache (batched prefill, then one decode step per
continuation token) must match transformers' full-sequence forward to 1e-4 relative. Tokens: greedy
generation alone and with 8 prompts of different lengths in one call must equal transformers'
per-prompt `generate` exactly. `test_reference_is_decisive` guards the exact-token checks: it fails
when a reference top-1/top-2 logit gap or a router's pick is close enough for float32 rounding to flip.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.hf_models import (
    CASES, RouterProbe, assert_logits_close, build_hf_checkpoint, case_id, case_seed, load_reference,
    make_prompts, reference_greedy, reference_logits,
)

TF_PROMPT_LENS, TF_CONT_LENS = [13, 5, 22], [6, 4, 6]
GEN_PROMPT_LENS = [3, 16, 17, 40, 5, 29, 11, 33]  # around block_size 16 on purpose
MAX_TOKENS = 32
ENGINE_KWARGS = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=512, block_size=16)
# Gaps must dwarf float32 noise (~1e-6): top-2 logits relative to max(1, max |logit|), as the logits
# tolerance; router picks in router logits, or in biased sigmoid scores for DeepSeek-V3.
MIN_TOKEN_MARGIN, MIN_ROUTER_GAP = 1e-4, 2e-5
CHUNKED_CASES = [("deepseek_v3", "default"), ("mixtral", "sliding_window"), ("qwen2_moe", "sparse_step2")]
SMALL_BLOCK_CASES = [("deepseek_v2", "group_limited_yarn"), ("mixtral", "sliding_window"),
                     ("qwen3_moe", "default"), ("olmoe", "clip_qkv")]

# Tiny models: a second thread only adds synchronisation (about 1.7x slower on 2 cores).
pytestmark = pytest.mark.usefixtures("single_threaded_torch")


@dataclass(frozen=True, kw_only=True, slots=True)
class Reference:
    """One case's checkpoint and what transformers computes on it."""

    ckpt_dir: Path
    tf_prompts: list[list[int]]
    tf_conts: list[list[int]]
    logits: list[torch.Tensor]  # [P + C, V] per sequence
    gen_prompts: list[list[int]]
    tokens: list[list[int]]  # MAX_TOKENS greedy tokens per prompt, at batch 1
    token_margin: float
    router_gap: float


def _compute_reference(case: tuple[str, str], out_dir: Path) -> Reference:
    family, variant = case
    ckpt_dir = build_hf_checkpoint(family, out_dir, variant=variant, seed=case_seed(case))
    model = load_reference(ckpt_dir)
    vocab = model.config.vocab_size
    tf_prompts, tf_conts = make_prompts(vocab, TF_PROMPT_LENS, seed=1), make_prompts(vocab, TF_CONT_LENS, seed=2)
    gen_prompts = make_prompts(vocab, GEN_PROMPT_LENS, seed=3)
    probe = RouterProbe(model)
    logits = reference_logits(model, tf_prompts, tf_conts)
    greedy = [reference_greedy(model, p, MAX_TOKENS) for p in gen_prompts]
    probe.close()
    return Reference(
        ckpt_dir=ckpt_dir, tf_prompts=tf_prompts, tf_conts=tf_conts, logits=logits, gen_prompts=gen_prompts,
        tokens=[tokens for tokens, _ in greedy], token_margin=min(margin for _, margin in greedy),
        router_gap=probe.min_gap,
    )


class References:
    """Builds each case's checkpoint and reference once per session, on first use."""

    def __init__(self, root: Path):
        self._root = root
        self._refs: dict[tuple[str, str], Reference] = {}

    def __getitem__(self, case: tuple[str, str]) -> Reference:
        if case not in self._refs:
            self._refs[case] = _compute_reference(case, self._root / case_id(case))
        return self._refs[case]


@pytest.fixture(scope="session")
def references(tmp_path_factory) -> References:
    return References(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="session", params=CASES, ids=case_id)
def ref(request, references) -> Reference:
    return references[request.param]


@pytest.fixture(scope="session")
def llm(ref):
    """One engine per case; session scope makes pytest run each case's tests together."""
    from expertmesh import LLM

    return LLM(model=str(ref.ckpt_dir), **ENGINE_KWARGS)


def _greedy():
    from expertmesh import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _generate_ids(llm, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy())
    return [list(out.outputs[0].token_ids) for out in outs]


def _assert_same_tokens(got: list[list[int]], want: list[list[int]]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        first = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), None)
        assert g == w, f"prompt {i}: {len(g)} tokens, first difference at step {first}:\n got  {g}\n want {w}"


def test_reference_is_decisive(ref):
    """Near-ties in the reference would make exact token parity a coin toss, not a check."""
    assert ref.token_margin >= MIN_TOKEN_MARGIN, (
        f"greedy top-1/top-2 gap {ref.token_margin:.2e}: pick another seed in hf_models._CASE_SEEDS"
    )
    assert ref.router_gap >= MIN_ROUTER_GAP, (
        f"router selection gap {ref.router_gap:.2e}: pick another seed in hf_models._CASE_SEEDS"
    )
    assert len({t for tokens in ref.tokens for t in tokens}) >= 16, "greedy output too repetitive to test much"


def test_teacher_forced_logits_match_transformers(llm, ref):
    got = llm.teacher_forced_logits(prompt_token_ids=ref.tf_prompts, continuation_token_ids=ref.tf_conts)
    assert all(g.dtype == torch.float32 for g in got)
    assert_logits_close(got, ref.logits)


def test_greedy_at_batch_1_matches_transformers(llm, ref):
    got = [_generate_ids(llm, [prompt])[0] for prompt in ref.gen_prompts]
    _assert_same_tokens(got, ref.tokens)


def test_greedy_with_8_prompts_in_one_call_matches_transformers(llm, ref):
    _assert_same_tokens(_generate_ids(llm, ref.gen_prompts), ref.tokens)


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=case_id)
def test_chunked_prefill_matches_transformers(case, references):
    """A 16-token budget splits every prompt over 13 tokens into several prefill chunks."""
    _assert_engine_matches(references[case], max_num_batched_tokens=16)


@pytest.mark.parametrize("case", SMALL_BLOCK_CASES, ids=case_id)
def test_block_size_4_matches_transformers(case, references):
    """Sequences span many small cache blocks, so block-table indexing is exercised on every step."""
    _assert_engine_matches(references[case], block_size=4)


def _assert_engine_matches(ref, **engine_overrides) -> None:
    """Logits and greedy tokens of an engine configured with `engine_overrides` equal transformers'."""
    from expertmesh import LLM

    llm = LLM(model=str(ref.ckpt_dir), **{**ENGINE_KWARGS, **engine_overrides})
    got = llm.teacher_forced_logits(prompt_token_ids=ref.tf_prompts, continuation_token_ids=ref.tf_conts)
    assert_logits_close(got, ref.logits)
    _assert_same_tokens(_generate_ids(llm, ref.gen_prompts), ref.tokens)
