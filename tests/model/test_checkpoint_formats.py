"""Checkpoint formats: the same transformers parity after fused experts, published configs, resharding and
in bf16/fp16; clear errors for checkpoints that cannot load.

The `*_loads_in_transformers` tests check the format helpers themselves against transformers, so a
failure there is in `tests/hf_models.py`, not in expertmesh.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.hf_models import (
    CASES, SUPPORTED_FAMILIES, assert_logits_close, build_hf_checkpoint, case_id, case_seed, load_reference,
    make_prompts, read_tensors, reference_logits, reshard, to_fused_experts, to_published_config,
)

TF_PROMPT_LENS, TF_CONT_LENS = [13, 5, 22], [6, 4, 6]
ENGINE_KWARGS = dict(max_num_seqs=8, max_num_batched_tokens=512, block_size=16)
FAMILY_DEFAULTS = [(family, "default") for family in SUPPORTED_FAMILIES]
RESHARD_CASES = [("deepseek_v3", "default"), ("mixtral", "default"), ("qwen3_moe", "default")]
# Loose bounds on |engine - transformers| / |transformers| (Frobenius, all rows) in the same dtype: each
# is a few times transformers' own low-precision error against float32 on these cases.
LOW_PRECISION_CASES = [
    ("bfloat16", ("deepseek_v3", "yarn_one_group"), 0.1), ("bfloat16", ("qwen2_moe", "default"), 0.1),
    ("bfloat16", ("mixtral", "sliding_window"), 0.1), ("float16", ("deepseek_v2", "default"), 0.02),
    ("float16", ("olmoe", "default"), 0.02), ("float16", ("qwen3_moe", "mlp_only_top1"), 0.02),
]

# Tiny models: a second thread only adds synchronisation (about 1.7x slower on 2 cores).
pytestmark = pytest.mark.usefixtures("single_threaded_torch")


class Originals:
    """Each case's transformers-written checkpoint and float32 reference logits, built once on first use."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[tuple, tuple[Path, list[torch.Tensor]]] = {}

    def __call__(self, case: tuple[str, str], dtype: str = "float32") -> tuple[Path, list[torch.Tensor]]:
        if (case, dtype) not in self._cache:
            family, variant = case
            ckpt = build_hf_checkpoint(family, self.root / f"{case_id(case)}-{dtype}", variant=variant,
                                       dtype=getattr(torch, dtype), seed=case_seed(case))
            model = load_reference(ckpt, dtype=getattr(torch, dtype))
            self._cache[case, dtype] = ckpt, reference_logits(model, *prompts_for(model.config.vocab_size))
        return self._cache[case, dtype]


def prompts_for(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    return make_prompts(vocab, TF_PROMPT_LENS, seed=1), make_prompts(vocab, TF_CONT_LENS, seed=2)


@pytest.fixture(scope="session")
def originals(tmp_path_factory) -> Originals:
    return Originals(tmp_path_factory.mktemp("formats"))


def engine_logits(ckpt_dir: Path, dtype: str = "float32") -> list[torch.Tensor]:
    from expertmesh import LLM

    llm = LLM(model=str(ckpt_dir), dtype=dtype, **ENGINE_KWARGS)
    vocab = json.loads((ckpt_dir / "config.json").read_text())["vocab_size"]
    prompts, conts = prompts_for(vocab)
    return llm.teacher_forced_logits(prompt_token_ids=prompts, continuation_token_ids=conts)


def transformers_logits(ckpt_dir: Path) -> list[torch.Tensor]:
    model = load_reference(ckpt_dir)
    return reference_logits(model, *prompts_for(model.config.vocab_size))


def published_copy(ckpt_dir: Path, out_dir: Path) -> Path:
    shutil.copytree(ckpt_dir, out_dir)
    return to_published_config(out_dir)


# --- the format helpers, checked against transformers ---------------------------------------------


@pytest.mark.parametrize("case", FAMILY_DEFAULTS, ids=case_id)
def test_fused_experts_loads_in_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    fused = to_fused_experts(ckpt, tmp_path / "fused")
    before, after = read_tensors(ckpt), read_tensors(fused)
    assert not [k for k in after if re.search(r"\.experts\.\d+\.", k)], "per-expert tensors left"
    gate_up = after["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, H]
    down = after["model.layers.1.mlp.experts.down_proj"]  # [E, H, I]
    names = ("w1", "w3", "w2") if case[0] == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    prefix = "model.layers.1." + ("block_sparse_moe" if case[0] == "mixtral" else "mlp") + ".experts.2."
    gate, up, expert_down = (before[f"{prefix}{name}.weight"] for name in names)
    assert torch.equal(gate_up[2], torch.cat([gate, up])), "expert 2: gate rows, then up rows"
    assert torch.equal(down[2], expert_down)
    assert gate_up.shape[1] == 2 * down.shape[2] and gate_up.shape[2] == down.shape[1]
    assert_logits_close(transformers_logits(fused), want, rtol=1e-5)


@pytest.mark.parametrize("case", RESHARD_CASES, ids=case_id)
def test_reshard_loads_in_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    sharded = reshard(ckpt, tmp_path / "sharded", 3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    before, after = read_tensors(ckpt), read_tensors(sharded)
    assert set(index["weight_map"]) == set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert_logits_close(transformers_logits(sharded), want, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_published_config_loads_in_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    cfg = json.loads((published_copy(ckpt, tmp_path / "published") / "config.json").read_text())
    assert "rope_parameters" not in cfg and "rope_theta" in cfg and "torch_dtype" in cfg
    if cfg.get("rope_scaling"):
        assert cfg["rope_scaling"]["type"] == "yarn" and "rope_type" not in cfg["rope_scaling"]
    if case[0].startswith("deepseek"):
        assert "head_dim" not in cfg and "n_routed_experts" in cfg and "scoring_func" in cfg
    if case[0] in ("qwen2_moe", "qwen3_moe", "olmoe"):
        assert "num_experts" in cfg and "num_local_experts" not in cfg
    assert_logits_close(transformers_logits(tmp_path / "published"), want, rtol=1e-5)


# --- expertmesh on each format ------------------------------------------------------------------


@pytest.mark.parametrize("case", FAMILY_DEFAULTS, ids=case_id)
def test_fused_experts_checkpoint_matches_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    assert_logits_close(engine_logits(to_fused_experts(ckpt, tmp_path / "fused")), want)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_published_config_matches_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    assert_logits_close(engine_logits(published_copy(ckpt, tmp_path / "published")), want)


@pytest.mark.parametrize("case", RESHARD_CASES, ids=case_id)
def test_resharded_checkpoint_matches_transformers(case, originals, tmp_path):
    ckpt, want = originals(case)
    assert_logits_close(engine_logits(reshard(ckpt, tmp_path / "sharded", 3)), want)


@pytest.mark.parametrize("dtype,case,max_rel_err", LOW_PRECISION_CASES,
                         ids=[f"{d}-{case_id(c)}" for d, c, _ in LOW_PRECISION_CASES])
def test_low_precision_checkpoint_close_to_transformers(dtype, case, max_rel_err, originals):
    ckpt, want = originals(case, dtype)  # transformers run in `dtype` too
    got = engine_logits(ckpt, dtype)
    assert all(torch.isfinite(g).all() for g in got), "non-finite logits"
    got_all, want_all = torch.cat(got).float(), torch.cat(want).float()  # [sum(P + C), V]
    rel_err = float((got_all - want_all).norm() / want_all.norm())
    assert rel_err <= max_rel_err, f"{dtype}: relative error {rel_err:.3g} > {max_rel_err}"


# --- checkpoints that must not load -------------------------------------------------------------


@pytest.fixture(scope="session")
def mixtral_ckpt(originals) -> Path:
    return originals(("mixtral", "default"))[0]


def load(ckpt_dir: Path):
    from expertmesh.model import load_model

    return load_model(ckpt_dir, dtype=torch.float32)


def rewrite_tensors(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = read_tensors(dst)
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_model_type_lists_supported_types(mixtral_ckpt, tmp_path):
    shutil.copytree(mixtral_ckpt, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_type": "llama"}))
    with pytest.raises(ValueError) as err:
        load(tmp_path / "ckpt")
    assert "llama" in str(err.value)
    assert all(family in str(err.value) for family in SUPPORTED_FAMILIES), str(err.value)


@pytest.mark.parametrize("name", ["model.layers.1.post_attention_layernorm.weight",
                                  "model.layers.0.block_sparse_moe.experts.3.w3.weight"])
def test_missing_tensor_is_named(name, mixtral_ckpt, tmp_path):
    ckpt = rewrite_tensors(mixtral_ckpt, tmp_path / "ckpt", lambda tensors: tensors.pop(name))
    with pytest.raises(ValueError, match=re.escape(name)):
        load(ckpt)


def test_misshaped_tensor_names_tensor_and_both_shapes(mixtral_ckpt, tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"  # [heads * head_dim, hidden] = [48, 48]

    def shrink(tensors):
        tensors[name] = tensors[name][:, :47].contiguous()

    ckpt = rewrite_tensors(mixtral_ckpt, tmp_path / "ckpt", shrink)
    with pytest.raises(ValueError, match=re.escape(name)) as err:
        load(ckpt)
    assert re.search(r"48\D{1,4}48\b", str(err.value)) and re.search(r"48\D{1,4}47\b", str(err.value)), str(err.value)


def test_pickle_only_checkpoint_requires_safetensors(mixtral_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(mixtral_ckpt / "config.json", ckpt / "config.json")
    torch.save(read_tensors(mixtral_ckpt), ckpt / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load(ckpt)
