"""Random-init DeepSeek-V3 checkpoints: presets, determinism, HF layout, sharding, tokenizer files."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import expertmesh.testing
from expertmesh.testing import init_model
from expertmesh.testing.init_model import checkpoint_tensor_specs, write_random_checkpoint
from expertmesh.testing.presets import PRESETS, num_parameters, preset_config

PUBLISHED_CONFIG_KEYS = {
    "model_type", "architectures", "rope_theta", "rope_scaling", "scoring_func", "topk_method", "n_routed_experts",
    "num_experts_per_tok", "n_group", "topk_group", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq",
    "norm_topk_prob", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype", "hidden_act", "attention_bias",
    "initializer_range",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0)


def _weights(path):
    return load_file(path / "model.safetensors")


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'.*\['small', 'tiny'\]"):
        preset_config("huge")


def test_config_uses_published_deepseek_v3_spelling():
    config = preset_config("tiny")
    assert PUBLISHED_CONFIG_KEYS <= config.keys()
    assert (config["model_type"], config["architectures"]) == ("deepseek_v3", ["DeepseekV3ForCausalLM"])
    assert (config["scoring_func"], config["topk_method"], config["moe_layer_freq"]) == ("sigmoid", "noaux_tc", 1)
    assert config["rope_scaling"] == {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    }


def test_small_preset_is_the_documented_342m_shape_without_writing_it():
    config = preset_config("small")
    expected = dict(
        vocab_size=32000, hidden_size=768, num_hidden_layers=8, first_k_dense_replace=1, intermediate_size=2048,
        n_routed_experts=64, moe_intermediate_size=256, num_experts_per_tok=6, n_group=8, topk_group=4,
        n_shared_experts=2, num_attention_heads=12, num_key_value_heads=12, q_lora_rank=384, kv_lora_rank=256,
        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=4096,
    )
    assert {k: config[k] for k in expected} == expected
    params = num_parameters(config)
    assert params == 342_264_000
    assert params == sum(math.prod(s.shape) for s in checkpoint_tensor_specs(config))
    assert round(params * 4 / 1e9, 2) == 1.37  # float32 bytes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_tensor_specs_agree_with_config_arithmetic(name):
    config = preset_config(name)
    assert sum(math.prod(s.shape) for s in checkpoint_tensor_specs(config)) == num_parameters(config)


def test_same_seed_writes_identical_files_and_other_seed_other_weights(tiny_dir, tmp_path):
    again = write_random_checkpoint("tiny", tmp_path / "again", seed=0)
    for path in tiny_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = _weights(write_random_checkpoint("tiny", tmp_path / "other", seed=1))
    base = _weights(tiny_dir)
    assert not torch.equal(other["model.layers.1.mlp.gate.weight"], base["model.layers.1.mlp.gate.weight"])
    assert torch.equal(other["model.norm.weight"], base["model.norm.weight"])


def test_tokenizer_training_is_deterministic_and_fills_the_vocab():
    first = init_model._train_tokenizer(1024)
    assert first.to_str() == init_model._train_tokenizer(1024).to_str()
    assert first.get_vocab_size() == 1024
    assert [first.token_to_id(t) for t in init_model._SPECIAL_TOKENS] == [0, 1, 2, 3]
    # The small preset's corpus runs out of merges; reserved special tokens fill the rest.
    assert init_model._train_tokenizer(32000).get_vocab_size() == 32000


def test_weights_have_hf_names_and_initial_values(tiny_dir):
    config = json.loads((tiny_dir / "config.json").read_text())
    weights = _weights(tiny_dir)
    assert set(weights) == {s.name for s in checkpoint_tensor_specs(config)}
    assert weights["model.layers.0.mlp.gate_proj.weight"].shape == (384, 128)  # dense first layer
    assert weights["model.layers.1.mlp.experts.15.down_proj.weight"].shape == (128, 64)
    assert weights["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (64, 128)
    assert torch.equal(weights["model.layers.2.self_attn.kv_a_layernorm.weight"], torch.ones(64))
    bias = weights["model.layers.3.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and 0 < bias.std() < 0.05
    assert abs(weights["lm_head.weight"].std().item() - 0.02) < 0.002


def test_bfloat16_keeps_correction_bias_float32(tmp_path):
    out = write_random_checkpoint("tiny", tmp_path, dtype="bfloat16")
    weights = _weights(out)
    assert weights["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert weights["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_random_checkpoint("tiny", tmp_path, dtype="int8")


def test_sharded_writing_has_index_and_same_tensors(tiny_dir, tmp_path):
    config = preset_config("tiny")
    init_model._write_weights(config, tmp_path, seed=0, dtype=torch.float32, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    assert len(shard_names) > 3 and shard_names[0] == f"model-00001-of-{len(shard_names):05d}.safetensors"
    assert sorted(tmp_path.glob("*.safetensors")) == [tmp_path / n for n in shard_names]
    single = _weights(tiny_dir)
    assert set(index["weight_map"]) == set(single)
    total = 0
    for name, filename in index["weight_map"].items():
        with safe_open(tmp_path / filename, framework="pt") as f:
            tensor = f.get_tensor(name)
        assert torch.equal(tensor, single[name]), name
        total += tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    # Rewriting as a single file removes the shards and the index.
    init_model._write_weights(config, tmp_path, seed=0, dtype=torch.float32, max_shard_bytes=10**9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_transformers_loads_tiny_without_missing_keys_and_runs_forward(tiny_dir):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.rope_parameters["rope_type"] == "yarn"
    state = model.state_dict()
    weights = _weights(tiny_dir)
    assert torch.equal(state["model.layers.1.mlp.gate.e_score_correction_bias"],
                       weights["model.layers.1.mlp.gate.e_score_correction_bias"])
    # transformers stacks the per-expert tensors; expert 3 must land in slot 3.
    gate_up = torch.cat([weights["model.layers.2.mlp.experts.3.gate_proj.weight"],
                         weights["model.layers.2.mlp.experts.3.up_proj.weight"]])
    assert torch.equal(state["model.layers.2.mlp.experts.gate_up_proj"][3], gate_up)
    with torch.no_grad():
        logits = model(torch.tensor([[0, 17, 42, 99, 5]])).logits  # [B, T, V]
    assert logits.shape == (1, 5, 2048) and torch.isfinite(logits).all()


def test_testing_package_imports_only_model_kernels_engine_and_itself():
    allowed = ("expertmesh.model", "expertmesh.kernels", "expertmesh.engine", "expertmesh.testing")
    package_dir = Path(expertmesh.testing.__file__).parent
    imported = set()
    for path in package_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                imported |= {(path.name, alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add((path.name, node.module))
    outside = sorted((name, module) for name, module in imported
                     if module.split(".")[0] == "expertmesh" and not module.startswith(allowed))
    assert not outside, f"expertmesh.testing imports outside {allowed}: {outside}"
    # Transitively too: writing a checkpoint must not start loading the serving stack.
    code = ("import sys, expertmesh.testing; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'grpc', 'fastapi'}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout
