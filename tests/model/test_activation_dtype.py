"""`activation_dtype="float32"` over bfloat16 weights: the residual stream, norms, attention and routing in float32,
each matmul reading its input rounded to bf16 and summing in float32 into a float32 output, as llama.cpp runs a
bf16 model. The weights stay bf16 in memory. Checked against transformers in float32 over the same bf16 weights
(a bf16 checkpoint loaded in float32): greedy decode follows it up to a near-tie, on an MLA and two GQA families.
"""

from __future__ import annotations

import pytest
import torch

from expertmesh import LLM, SamplingParams
from expertmesh.cli import main
from expertmesh.model import AttentionMetadata, load_model
from expertmesh.model.int8_layers import Int8Linear
from expertmesh.model.layers import Linear, RMSNorm
from expertmesh.model.moe import RoutedExperts, Router
from tests.hf_models import (assert_greedy_follows_up_to_a_near_tie, build_hf_checkpoint, case_seed, load_reference,
                              make_prompts)

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

PROMPT_LENS, MAX_TOKENS = [5, 17, 30], 12
# A near-tie: the reference's top-1/top-2 gap, relative to max(1, max |logit|), below this at the step where the
# tokens part. Each of our matmuls rounds its input to bf16 and the reference's does not: seen 0.050 (mixtral,
# the 30-token prompt, step 10); bf16 against bf16 (tests/model/test_bf16_decode.py) parts below 0.04.
TIE = 0.065


def _checkpoint(tmp_path, family):
    return build_hf_checkpoint(family, tmp_path / family, dtype=torch.bfloat16, seed=case_seed((family, "mixed")))


@pytest.mark.parametrize("family, backend", [("deepseek_v3", "auto"), ("qwen3_moe", "auto"), ("mixtral", "auto"),
                                             ("deepseek_v3", "torch")])
def test_greedy_decode_follows_transformers_float32_over_the_bf16_weights(tmp_path, monkeypatch, family, backend):
    """`torch`: the reference paths (what runs off the CPU kernels) take bf16 weights under float32 activations
    too, MLA's absorbed decode included."""
    monkeypatch.setenv("EXPERTMESH_KERNELS", backend)
    ckpt = _checkpoint(tmp_path, family)
    reference = load_reference(ckpt, dtype=torch.float32)  # bf16 values, float32 math
    llm = LLM(model=str(ckpt), dtype="bfloat16", activation_dtype="float32", max_num_seqs=4)
    prompts = make_prompts(reference.config.vocab_size, PROMPT_LENS, seed=3)
    assert_greedy_follows_up_to_a_near_tie(llm, reference, prompts, MAX_TOKENS, TIE)


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_the_weights_stay_bf16_and_the_residual_stream_is_float32(tmp_path, family):
    model = load_model(_checkpoint(tmp_path, family), "bfloat16", activation_dtype="float32")
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            assert module.weight.dtype == torch.bfloat16, name
        elif isinstance(module, RoutedExperts):
            assert module.w13.dtype == module.w2.dtype == torch.bfloat16, name
        elif isinstance(module, (RMSNorm, Router)):
            assert module.weight.dtype == torch.float32, name
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype)) for layer in model.model.layers]
    hooks.append(model.model.norm.register_forward_hook(lambda _m, inputs, out: seen.extend([inputs[0].dtype,
                                                                                              out.dtype])))
    prompt = make_prompts(model.config.vocab_size, [9], seed=1)[0]
    with torch.inference_mode():
        logits = model(torch.tensor(prompt), AttentionMetadata.without_cache([len(prompt)]), None)
    for hook in hooks:
        hook.remove()
    assert seen == [torch.float32] * (len(model.model.layers) + 2) and logits.dtype == torch.float32


def test_int8_over_float32_activations_quantises_the_bf16_weights(tmp_path):
    """quantization with activation_dtype: int8 layers read float32 activations, as they do in a float32 model."""
    ckpt = _checkpoint(tmp_path, "deepseek_v3")
    llm = LLM(model=str(ckpt), dtype="bfloat16", activation_dtype="float32", quantization="int8")
    model = llm.llm_engine.executor.model
    assert model.activation_dtype == torch.float32
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    out = llm.generate([{"prompt_token_ids": [5, 9, 13]}], SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_activation_dtypes_that_do_not_fit_are_refused_by_name(tiny_model_dir, capsys):
    for dtype, activations in (("bfloat16", "float16"), ("float32", "bfloat16"), ("bfloat16", "int8")):
        with pytest.raises(ValueError, match="activation_dtype"):
            LLM(str(tiny_model_dir), dtype=dtype, activation_dtype=activations)
    with pytest.raises(ValueError, match="enable_lora with activation_dtype='float32'"):
        LLM(str(tiny_model_dir), dtype="bfloat16", activation_dtype="float32", enable_lora=True)
    LLM(str(tiny_model_dir), dtype="float32", activation_dtype="float32").shutdown()  # the weights' own: fine
    with pytest.raises(SystemExit):
        main(["serve", "--model", str(tiny_model_dir), "--activation-dtype", "float16"])
    assert "argument --activation-dtype: invalid choice: 'float16'" in capsys.readouterr().err


def test_serve_hands_the_flag_to_the_engine(tiny_model_dir):
    import subprocess
    import sys

    import yaml

    out = subprocess.run([sys.executable, "-m", "expertmesh", "serve", "--model", str(tiny_model_dir), "--dtype",
                          "bfloat16", "--activation-dtype", "float32", "--print-serve-config"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    (app,) = yaml.safe_load(out)["applications"]
    assert app["args"]["engine_kwargs"] == {"activation_dtype": "float32"}
