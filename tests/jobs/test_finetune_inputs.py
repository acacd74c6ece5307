"""The fine-tuning job's inputs: its YAML config (the issue's example loads; every bad field is named by its
path before anything starts) and its training examples (what the loss learns in each data format, and every
bad line named by its number)."""

from __future__ import annotations

import json

import pytest

from expertmesh.engine.tokenizer import Tokenizer, load_eos_token_ids
from expertmesh.jobs.finetune import FinetuneConfig, load_examples
from expertmesh.jobs.finetune.config import DataConfig
from expertmesh.jobs.finetune.data import IGNORE_INDEX
from expertmesh.testing.init_model import EOS_TOKEN

EXAMPLE = """
model: models/tiny                 # checkpoint directory (every node sees it)
data: {path: train.jsonl, format: text, max_seq_len: 256}   # text | chat | completion
output_dir: runs/demo
lora: {r: 8, alpha: 16, targets: [routed_experts, shared_experts, attention]}
experts: {select: esft_gate, threshold: 0.2}                 # all | esft_gate | esft_token
train: {steps: 50, batch_size: 4, lr: 1.0e-3, seed: 0, checkpoint_every: 10}
guard: {}                                                    # thresholds and actions, defaults below
scaling: {num_workers: 2, use_gpu: false}
deployment: null                   # or the serving deployment (file or mapping): experts on shard actors
"""


def test_the_issues_example_config_loads_with_paths_from_its_directory(tmp_path):
    path = tmp_path / "finetune.yaml"
    path.write_text(EXAMPLE)
    config = FinetuneConfig.load(path)
    assert config.model == str(tmp_path / "models/tiny") and config.output_dir == str(tmp_path / "runs/demo")
    assert config.data.path == str(tmp_path / "train.jsonl") and config.data.max_seq_len == 256
    assert config.lora.r == 8 and config.lora.targets == ("routed_experts", "shared_experts", "attention")
    assert config.experts.select == "esft_gate" and config.train.lr == 1e-3 and config.scaling.num_workers == 2
    assert config.deployment is None and config.guard.max_over_mean == (1.5, 2.0, 3.0)  # `guard: {}`: defaults


@pytest.mark.parametrize(("change", "says"), [
    ({"modle": "x"}, "unknown config field 'modle'"),
    ({"lora": {"rank": 8}}, "unknown config field 'lora.rank'"),
    ({"lora": {"r": 0}}, "lora.r must be an integer >= 1, got 0"),
    ({"lora": {"targets": ["experts"]}}, "lora.targets[0] must be one of"),
    ({"data": {"path": "t.jsonl", "format": "parquet"}}, "data.format must be one of"),
    ({"data": {"format": "text"}}, "data.path is required"),
    ({"experts": {"select": "esft_gate", "threshold": 1.5}}, "experts.threshold must be in (0, 1]"),
    ({"train": {"lr": -1}}, "train.lr must be in (0, 1]"),
    ({"train": {"steps": 2.5}}, "train.steps must be an integer >= 1"),
    ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu must be true or false"),
    ({"output_dir": None}, "the config needs 'output_dir'"),
    ({"guard": [1]}, "guard must be a mapping"),
    ({"guard": {"max_over_mean": [2, 1.5, 3]}}, "guard.max_over_mean must rise from warn to stop"),
    ({"guard": {"overlap": [0.5, 0.6, 0.2]}}, "guard.overlap must fall from warn to stop"),
    ({"guard": {"patience": 3}}, "unknown config field 'guard.patience'"),
    ({"deployment": 3}, "deployment must be a file path or a mapping"),
])
def test_a_bad_field_is_named_by_its_path(change, says):
    raw = {"model": "m", "data": {"path": "t.jsonl"}, "output_dir": "out", **change}
    with pytest.raises(ValueError) as e:
        FinetuneConfig.from_dict(raw)
    assert says in str(e.value)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir), load_eos_token_ids(tiny_model_dir)[0]


def _write(tmp_path, records, name="train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _learnt(tokenizer, example) -> str:
    return tokenizer.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX],
                            skip_special_tokens=False)


def test_text_learns_every_token_and_the_end(tmp_path, tok):
    tokenizer, eos = tok
    path = _write(tmp_path, [{"text": "experts route tokens"}, "", {"text": "a second line"}])
    first, second = load_examples(DataConfig(path=path, format="text"), tokenizer, eos)
    assert first.input_ids == tokenizer.encode("experts route tokens") + [eos] and first.labels == first.input_ids
    assert second.input_ids[-1] == eos  # the blank line between was skipped


def test_completion_learns_the_completion_only(tmp_path, tok):
    tokenizer, eos = tok
    path = _write(tmp_path, [{"prompt": "Q: what routes tokens?", "completion": " A: the gate"}])
    (ex,) = load_examples(DataConfig(path=path, format="completion"), tokenizer, eos)
    prompt = tokenizer.encode("Q: what routes tokens?")
    assert ex.input_ids[:len(prompt)] == prompt and ex.labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert _learnt(tokenizer, ex) == " A: the gate" + EOS_TOKEN


def test_chat_learns_the_assistants_turns_only(tmp_path, tok):
    tokenizer, eos = tok
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "route?"}, {"role": "assistant", "content": "to two experts"}]
    path = _write(tmp_path, [{"messages": messages}])
    (ex,) = load_examples(DataConfig(path=path, format="chat", max_seq_len=512), tokenizer, eos)
    # the whole conversation is the template's rendering, token for token
    assert tokenizer.decode(ex.input_ids, skip_special_tokens=False) == tokenizer.apply_chat_template(
        messages, add_generation_prompt=False)
    assert _learnt(tokenizer, ex) == "hello there" + EOS_TOKEN + "to two experts" + EOS_TOKEN


def test_long_examples_are_cut_at_max_seq_len(tmp_path, tok):
    tokenizer, eos = tok
    path = _write(tmp_path, [{"text": "many words " * 100}])
    (ex,) = load_examples(DataConfig(path=path, format="text", max_seq_len=16), tokenizer, eos)
    assert len(ex.input_ids) == len(ex.labels) == 16


@pytest.mark.parametrize(("fmt", "lines", "says"), [
    ("text", None, "does not exist"),
    ("text", ["", "  "], "holds no examples"),
    ("text", [{"text": "ok"}, "{not json"], "line 2: not valid JSON"),
    ("text", [[1, 2]], "line 1: each line must be a JSON object"),
    ("text", [{"txt": "x"}], "line 1: a text example needs a non-empty string 'text'"),
    ("completion", [{"prompt": "p"}], "line 1: a completion example needs a non-empty string 'completion'"),
    ("completion", [{"prompt": "word " * 50, "completion": "x"}], "line 1: nothing to learn within"),
    ("chat", [{"messages": [{"role": "user", "content": "hi"}]}], "line 1: a chat example needs at least one"),
    ("chat", [{"messages": "hi"}], "line 1: a chat example needs a non-empty list 'messages'"),
])
def test_bad_data_is_named_by_its_line(tmp_path, tok, fmt, lines, says):
    tokenizer, eos = tok
    path = str(tmp_path / "missing.jsonl") if lines is None else _write(tmp_path, lines)
    with pytest.raises(ValueError) as e:
        load_examples(DataConfig(path=path, format=fmt, max_seq_len=8), tokenizer, eos)
    assert says in str(e.value)


def test_the_kuberay_jobs_config_is_one_the_job_takes():
    from pathlib import Path

    import yaml as pyyaml

    manifest = Path(__file__).resolve().parents[2] / "infra" / "k8s" / "rayjob-finetune.yaml"
    (config_map,) = [d for d in pyyaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "ConfigMap"]
    config = FinetuneConfig.from_dict(pyyaml.safe_load(config_map["data"]["finetune.yaml"]))
    assert config.scaling.use_gpu and config.deployment is None


def test_a_lora_target_that_matches_nothing_is_refused_before_anything_starts(tmp_path):
    from hf_models import build_hf_checkpoint

    from expertmesh.jobs.finetune.job import prepare

    mixtral = build_hf_checkpoint("mixtral", tmp_path / "mixtral")  # routed experts only, no shared expert
    (tmp_path / "train.jsonl").write_text('{"text": "a b c"}\n')
    config = FinetuneConfig.from_dict({"model": str(mixtral), "data": {"path": "train.jsonl"}, "output_dir": "out",
                                       "lora": {"targets": ["attention", "shared_experts"]}}, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"lora.targets\[1\] 'shared_experts' matches nothing .* \(mixtral has no "
                                         "shared experts"):
        prepare(config)
    assert not (tmp_path / "out").exists()
