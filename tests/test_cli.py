"""The `expertmesh` command line, run as users run it: `python -m expertmesh` and the console script.

Each subprocess pays for importing torch, so the process-level tests are few; the remaining error
paths call `cli.main` in-process, which is what both entry points run.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from expertmesh import LLM, SamplingParams, cli

pytestmark = pytest.mark.usefixtures("single_threaded_torch")

# One intra-op thread: on a loaded shared CPU, OpenMP's spinning workers make a tiny model crawl.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("EXPERTMESH_DEBUG", None)


def run(*args, executable=(sys.executable, "-m", "expertmesh")):
    return subprocess.run([*executable, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120)


def assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """What the library generates for the CLI's defaults (greedy) with 5 tokens."""
    llm = LLM(model=tiny_model_dir)
    outs = llm.generate(["Hello", "The cat"], SamplingParams(temperature=0.0, max_tokens=5))
    return [o.outputs[0] for o in outs]


def test_init_model_writes_the_library_checkpoint(tmp_path, tiny_model_dir):
    out = tmp_path / "ckpt"
    proc = run("init-model", "--preset", "tiny", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / name).is_file()
    # Same preset and seed as the library call: byte-identical weights.
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()


def test_generate_prints_the_output(tiny_model_dir, reference):
    proc = run("generate", "--model", tiny_model_dir, "--prompt", "Hello", "--max-tokens", 5)
    assert proc.returncode == 0, proc.stderr
    assert f"output: {reference[0].text!r}" in proc.stdout
    assert "5 tokens, finish_reason=length" in proc.stdout


def test_console_script_prints_one_json_object_per_prompt(tiny_model_dir, reference):
    script = shutil.which("expertmesh", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the expertmesh console script is not installed next to this interpreter")
    proc = run("generate", "--model", tiny_model_dir, "--prompt", "Hello", "--prompt", "The cat",
               "--max-tokens", 5, "--json", executable=(script,))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello", "The cat"]
    assert [(r["text"], r["token_ids"], r["finish_reason"]) for r in rows] == [
        (c.text, c.token_ids, c.finish_reason) for c in reference
    ]


def test_bad_model_dir_exits_with_a_one_line_error(tmp_path):
    proc = run("generate", "--model", tmp_path / "missing", "--prompt", "hi")
    assert_one_line_error(proc, "expertmesh generate: error:", str(tmp_path / "missing"), "config.json")


@pytest.mark.parametrize("make_args, needles", [
    pytest.param(lambda d, tmp: ["init-model", "--preset", "huge", "--out", tmp / "x"],
                 ["init-model: error:", "unknown model preset 'huge'"], id="unknown_preset"),
    pytest.param(lambda d, tmp: ["init-model", "--preset", "tiny", "--out", d / "config.json"],
                 ["init-model: error:", "config.json"], id="out_is_a_file"),
    pytest.param(lambda d, tmp: ["generate", "--model", tmp, "--prompt", "hi"],
                 ["generate: error:", "no config.json"], id="dir_without_checkpoint"),
    pytest.param(lambda d, tmp: ["generate", "--model", d, "--prompt", "hi", "--max-tokens", "0"],
                 ["generate: error:", "max_tokens"], id="bad_max_tokens"),
    pytest.param(lambda d, tmp: ["generate", "--model", d, "--prompt", "hi", "--top-p", "2"],
                 ["generate: error:", "top_p"], id="bad_top_p"),
])
def test_user_errors_return_nonzero_with_a_one_line_message(tiny_model_dir, tmp_path, capsys, make_args, needles):
    code = cli.main([str(a) for a in make_args(tiny_model_dir, tmp_path)])
    assert code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("expertmesh ")
    for needle in needles:
        assert needle in err


@pytest.mark.parametrize("flags, needles", [
    pytest.param(["--replicas", "2", "--max-replicas", "3"], ["--replicas", "--min-replicas/--max-replicas",
                                                              "exclude each other"], id="fixed_and_autoscaling"),
    pytest.param(["--min-replicas", "3", "--max-replicas", "2"], ["--min-replicas (3) is more than --max-replicas (2)"],
                 id="min_over_max"),
    pytest.param(["--min-replicas", "0", "--max-replicas", "2"], ["--min-replicas must be at least 1, got 0",
                                                                  "scaling to zero"], id="scale_to_zero"),
    pytest.param(["--min-replicas", "-1", "--max-replicas", "2"], ["--min-replicas must be an integer of at least 1"],
                 id="negative_min"),
    pytest.param(["--max-replicas", "0"], ["--max-replicas must be an integer of at least 1, got 0"], id="max_zero"),
    pytest.param(["--replicas", "0"], ["--replicas must be an integer of at least 1, got 0"], id="no_replicas"),
    pytest.param(["--min-replicas", "2"], ["--min-replicas is for autoscaling: give --max-replicas"], id="min_alone"),
    pytest.param(["--target-ongoing-requests", "4"], ["--target-ongoing-requests is for autoscaling"],
                 id="target_without_max"),
    pytest.param(["--max-replicas", "2", "--target-ongoing-requests", "0"],
                 ["--target-ongoing-requests must be a number above 0"], id="zero_target"),
    pytest.param(["--max-replicas", "2", "--max-num-seqs", "4", "--max-waiting", "8", "--target-ongoing-requests", "20"],
                 ["--target-ongoing-requests (20) is more than a replica holds: --max-num-seqs (4) + --max-waiting "
                  "(8) = 12"], id="target_past_what_a_replica_holds"),
    pytest.param(["--max-replicas", "2", "--autoscaling-config", '{"max_replicas": 5}'],
                 ["--autoscaling-config: set max_replicas with --max-replicas"], id="max_in_the_mapping"),
    pytest.param(["--max-replicas", "2", "--autoscaling-config", '{"upscale_delay": 5}'],
                 ["--autoscaling-config: unknown fields ['upscale_delay']"], id="unknown_field"),
    pytest.param(["--max-replicas", "2", "--autoscaling-config", '{"downscale_delay_s": -5}'],
                 ["--autoscaling-config: downscale_delay_s:"], id="serve_refuses_a_field"),
    pytest.param(["--num-threads", "0"], ["num_threads must be a positive integer", "got 0"], id="no_threads"),
])
@pytest.mark.parametrize("printed", [False, True], ids=["serve", "print_serve_config"])
def test_serve_refuses_bad_replica_flags_naming_them(tiny_model_dir, capsys, flags, needles, printed):
    """Refused in one line before Ray starts, whether serving or printing the Serve config."""
    extra = ["--print-serve-config"] if printed else []
    assert cli.main(["serve", "--model", str(tiny_model_dir), *flags, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("expertmesh serve: error: "), err
    for needle in needles:
        assert needle in err
    assert not ray.is_initialized()


def test_generate_on_an_actor_graph_prints_what_local_mode_prints(tiny_model_dir, reference, tmp_path):
    """`--deployment` starts a private local Ray cluster (none is running here), runs the prompts on the actor
    graph, and shuts it all down: same output as in process."""
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("attention_actors: 1\nexpert_shards: 2\ntransport: grpc\n")
    proc = run("generate", "--model", tiny_model_dir, "--prompt", "Hello", "--prompt", "The cat",
               "--max-tokens", 5, "--json", "--deployment", deployment)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["text"], r["token_ids"]) for r in rows] == [(c.text, c.token_ids) for c in reference]


def test_bad_deployment_file_is_a_one_line_error(tiny_model_dir, tmp_path):
    deployment = tmp_path / "deploy.yaml"
    deployment.write_text("expert_shards: 2\ntransport: smoke-signals\n")
    proc = run("generate", "--model", tiny_model_dir, "--prompt", "Hi", "--deployment", deployment)
    assert_one_line_error(proc, "expertmesh generate: error:", "transport must be one of")


def _unsupported_model_type(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _truncated_weights(ckpt: Path) -> None:
    weights = ckpt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)


@pytest.mark.parametrize("damage, needle", [
    pytest.param(_unsupported_model_type, "unsupported model_type 'llama'", id="unsupported_model_type"),
    pytest.param(_truncated_weights, "lies past the end of the file (truncated download?)", id="truncated_safetensors"),
])
def test_serve_and_generate_refuse_a_bad_checkpoint_with_the_same_line_before_ray(tmp_path, damage, needle):
    """`expertmesh serve` checks the checkpoint before it starts Ray: the one line `generate` prints, at once.
    A `ray` package that records its import stands first on the path: neither command may reach it."""
    from expertmesh.testing import write_random_checkpoint

    ckpt = write_random_checkpoint("tiny", tmp_path / "ckpt")
    damage(ckpt)
    fake = tmp_path / "fake-site"
    (fake / "ray").mkdir(parents=True)
    marker = tmp_path / "ray-imported"
    (fake / "ray" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('no Ray here')\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(fake), ENV.get("PYTHONPATH")]))}
    messages = {}
    for command, extra in (("generate", ["--prompt", "hi"]), ("serve", ["--port", "8765"])):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "expertmesh", command, "--model", str(ckpt), *extra],
                              capture_output=True, text=True, env=env, timeout=120)
        elapsed = time.monotonic() - start
        assert proc.returncode == 2, proc.stderr
        assert_one_line_error(proc, f"expertmesh {command}: error:", needle)
        assert elapsed < 10, f"{command} took {elapsed:.1f}s to refuse the checkpoint"
        assert not marker.exists(), f"{command} imported Ray"
        messages[command] = proc.stderr.strip().split(": error: ", 1)[1]
    assert messages["serve"] == messages["generate"]
