"""`LLM(..., quantization="int8")`: every linear layer but the gates is held as int8 with a scale per output row
(a quarter of its float32 bytes); "w8a8" quantises the activations too; with "experts_int8" only the routed
experts are. Next-token
predictions stay close to the float model's (top-1 agreement and mean KL over every position of random
sequences, teacher-forced), and unsupported settings are refused naming the field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from expertmesh import LLM, SamplingParams
from expertmesh.cli import main
from expertmesh.model import load_model
from expertmesh.model.moe import MoEBlock
from expertmesh.model.int8_layers import Int8Linear, Int8RoutedExperts
from expertmesh.testing.agreement import next_token_agreement

pytestmark = pytest.mark.usefixtures("single_threaded_torch")


def int8_linears(model) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, Int8Linear)}


@pytest.mark.parametrize("quantization, top1, max_mean_kl",
                         [("experts_int8", 0.97, 1e-4), ("int8", 0.93, 1e-4), ("w8a8", 0.92, 1e-4)])
def test_int8_predicts_as_the_float_model_does(tiny_model_dir, quantization, top1, max_mean_kl):
    llm = LLM(str(tiny_model_dir), quantization=quantization)
    quantized = llm.llm_engine.executor.model
    blocks = [layer.mlp for layer in quantized.model.layers if isinstance(layer.mlp, MoEBlock)]
    assert blocks and all(isinstance(b.experts, Int8RoutedExperts) for b in blocks)
    reference = load_model(tiny_model_dir)
    ref_experts = next(layer.mlp.experts for layer in reference.model.layers if isinstance(layer.mlp, MoEBlock))
    experts = blocks[0].experts
    assert experts.w13.dtype == torch.int8 and experts.w13.shape == ref_experts.w13.shape
    assert experts.w13.nbytes * 4 == ref_experts.w13.nbytes

    linears = int8_linears(quantized)
    # w8a8: every int8 layer of the tiny preset but kv_b_proj quantises its activations (sizes multiples of 32)
    int8_modules = [(n, m) for n, m in quantized.named_modules() if isinstance(m, (Int8Linear, Int8RoutedExperts))]
    assert all(m.quantize_activations == (quantization == "w8a8" and "kv_b_proj" not in n) for n, m in int8_modules)
    if quantization == "experts_int8":
        assert not linears
    else:  # attention (MLA's kv_b_proj too), shared experts, the dense layer and the LM head; never a gate
        assert {"lm_head", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.self_attn.kv_a_proj_with_mqa",
                "model.layers.1.self_attn.kv_b_proj"} <= linears
        assert not any("gate." in name or name.endswith(".gate") for name in linears)
        assert quantized.lm_head.qweight.nbytes * 4 == reference.lm_head.weight.nbytes

    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(0, reference.config.vocab_size, (48,), generator=gen).tolist() for _ in range(16)]
    agreement = next_token_agreement(reference, quantized, sequences)
    assert agreement.positions == 16 * 48
    assert agreement.top1 >= top1
    assert 0 < agreement.mean_kl < max_mean_kl  # not the float model itself, and close to it

    # decoding (the int8 C++ kernels at batch sizes of decode) serves whole generations
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [5, 9, 13]}, {"prompt_token_ids": list(range(40, 70))}], params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]


def test_unsupported_quantization_settings_are_refused(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ValueError,
                       match=r"quantization must be one of \['int8', 'w8a8', 'experts_int8'\] or None, got 'fp8'"):
        LLM(str(tiny_model_dir), quantization="fp8")
    with pytest.raises(ValueError, match="enable_lora with quantization='int8' is not served"):
        LLM(str(tiny_model_dir), quantization="int8", enable_lora=True)
    prequantized = tmp_path / "awq"
    shutil.copytree(tiny_model_dir, prequantized)
    config = json.loads((prequantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (prequantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"already quantised \(quantization_config: awq\)"):
        LLM(str(prequantized), quantization="int8")
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_model_dir), "--quantization", "fp8"])
    assert "argument --quantization: invalid choice: 'fp8'" in capsys.readouterr().err


def test_serve_carries_the_quantization_to_the_engine(tiny_model_dir, capsys):
    from expertmesh.platform.server.serve_app import app_builder
    from expertmesh.platform.server.settings import ServerSettings

    assert main(["serve", "--model", str(tiny_model_dir), "--quantization", "int8", "--print-serve-config"]) in (0, None)
    args = yaml.safe_load(capsys.readouterr().out)["applications"][0]["args"]
    assert args["engine_kwargs"] == {"quantization": "int8"}
    settings = ServerSettings(**app_builder({**args, "api_keys": "k"})._bound_deployment.init_args[0])
    assert settings.engine_config().quantization == "int8"


def test_int8_serves_a_bfloat16_model(tiny_model_dir):
    """int8 weights under bf16 activations: the kernels sum in float32 and round once, and a bf16 model's
    greedy tokens mostly survive quantisation."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 9, 13]}, {"prompt_token_ids": list(range(40, 70))}]
    bf16 = LLM(str(tiny_model_dir), dtype="bfloat16")
    int8 = LLM(str(tiny_model_dir), dtype="bfloat16", quantization="int8")
    model = int8.llm_engine.executor.model
    assert model.lm_head.qweight.dtype == torch.int8 and model.model.embed_tokens.weight.dtype == torch.bfloat16
    x = torch.randn(2, model.config.hidden_size).bfloat16()
    assert model.lm_head(x).dtype == torch.bfloat16
    want = [o.outputs[0].token_ids for o in bf16.generate(prompts, params)]
    got = [o.outputs[0].token_ids for o in int8.generate(prompts, params)]
    assert [len(t) for t in got] == [12, 12]
    assert got[0][:2] == want[0][:2] and got[1][:2] == want[1][:2]  # the first tokens agree; ties may split later
