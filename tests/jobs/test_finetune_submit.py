"""The fine-tuning job as a cluster runs it: `ray job submit` to a single-node cluster with token auth (the job
server refuses a client without the cluster's token), and a run that loses a Ray Train worker to SIGKILL
mid-run: the worker group restarts from the latest checkpoint and the run ends with every step counted once.

The cluster is `ray start --head --block` in a process group of its own, with its own temp dir, ports and
token (RAY_AUTH_TOKEN in its environment and in the clients': nothing is written to ~/.ray). It is shut down
by SIGTERM to that `ray start` alone, which stops its raylet (and so the workers) and its GCS in order;
whatever is left of the group is then killed. Never `ray stop`: it ends every Ray on the machine."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent  # the cluster's Python is this one: `python` in an entrypoint finds it
RAY = VENV_BIN / "ray"
STEP_LINE = re.compile(r"step (\d+)/(\d+) loss (\d+\.\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_env(token: str | None) -> dict[str, str]:
    """A process's environment holding `token` (None: no token, and token auth not asked for)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    if token is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


@dataclass
class Cluster:
    address: str  # the dashboard's job server
    token: str

    def command(self, group: str, command: str, *args: str) -> list[str]:
        """`ray GROUP COMMAND --address ... ARGS` (the address before the args: a job's entrypoint ends them)."""
        return [str(RAY), group, command, "--address", self.address, *args]

    def ray(self, group: str, command: str, *args: str, timeout: float = 60,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """The `ray` CLI against this cluster, holding its token unless `env` says otherwise."""
        return subprocess.run(self.command(group, command, *args), env=env or client_env(self.token),
                              capture_output=True, text=True, timeout=timeout)


def _wait_for_job_server(url: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    request = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"the job server at {url} did not answer in {timeout}s:\n{log.read_text()[-4000:]}")


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start` alone (to the whole group, the GCS would stop under the raylet's feet and the
    shutdown would hang); whatever is left of its group after that is killed."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def token_cluster():
    """A single-node cluster whose job server (127.0.0.1) asks for a token of its own."""
    token = secrets.token_hex(32)
    temp_dir = Path(tempfile.mkdtemp(prefix="em-ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    dashboard_port = _free_port()
    env = {**client_env(token), "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # draining is for Serve replicas; nothing to wait for
    log = temp_dir / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
             "--port", str(_free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--include-dashboard", "true", "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--num-cpus", "4", "--temp-dir", str(temp_dir)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        _wait_for_job_server(address, token, head, log)
        yield Cluster(address, token)
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def write_job(directory: Path, model_dir: Path, output_dir: Path, steps: int) -> Path:
    """A job's working dir: its config and data (relative to it), the model and the output absolute: the
    working dir is unpacked in the cluster's temp dir, and the output must outlive it."""
    directory.mkdir(parents=True)
    words = ["experts", "route", "tokens", "to", "the", "gate", "layers", "share", "a", "latent", "cache"]
    lines = [{"text": " ".join(words[(i + j) % len(words)] for j in range(6 + i % 5))} for i in range(16)]
    (directory / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (directory / "finetune.yaml").write_text(yaml.safe_dump({
        "model": str(model_dir), "data": {"path": "train.jsonl", "format": "text", "max_seq_len": 32},
        "output_dir": str(output_dir), "lora": {"r": 4, "alpha": 8},
        "experts": {"select": "esft_gate", "threshold": 0.3},
        "train": {"steps": steps, "batch_size": 4, "lr": 1.0e-3, "seed": 0, "checkpoint_every": 2},
        "scaling": {"num_workers": 2, "use_gpu": False},
    }))
    return directory


def submit_args(job_id: str, working_dir: Path) -> list[str]:
    """`ray job submit`'s arguments for the job in `working_dir` (see write_job)."""
    return ["--submission-id", job_id, "--working-dir", str(working_dir), "--",
            "python", "-m", "expertmesh.jobs.finetune", "--config", "finetune.yaml"]


def test_ray_job_submit_runs_the_job_and_refuses_a_client_without_the_token(token_cluster, tmp_path,
                                                                            tiny_model_dir):
    job_dir = write_job(tmp_path / "job", tiny_model_dir, tmp_path / "out", steps=4)

    # no token at all (and no ~/.ray/auth_token to fall back on), or another cluster's: refused
    nobody = {**client_env(None), "HOME": str(tmp_path)}
    refused = token_cluster.ray("job", "submit", *submit_args("not-mine", job_dir), env=nobody)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stderr, refused.stderr[-2000:]
    refused = token_cluster.ray("job", "submit", *submit_args("not-mine", job_dir),
                                env=client_env(secrets.token_hex(32)))
    assert refused.returncode != 0 and "Invalid authentication token" in refused.stderr, refused.stderr[-2000:]

    done = token_cluster.ray("job", "submit", *submit_args("finetune-submit", job_dir), timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    status = token_cluster.ray("job", "status", "finetune-submit")
    assert "Job 'finetune-submit' succeeded" in status.stdout, status.stdout + status.stderr
    logs = token_cluster.ray("job", "logs", "finetune-submit").stdout
    assert all(f"step {s}/4 loss" in logs for s in range(1, 5)), logs[-4000:]
    assert "fine-tuning completed: 4 steps" in logs
    listed = token_cluster.ray("job", "list").stdout
    assert "finetune-submit" in listed and "not-mine" not in listed

    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed" and report["steps_completed"] == 4 and len(report["losses"]) == 4


class Streamed:
    """A subprocess whose output lines are collected as they come, to wait on."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no {needle!r} in the output ({'exited' if self.proc.poll() is not None else 'timed out'})"
                            f":\n{self.text[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _train_worker_pids(cluster: Cluster) -> list[int]:
    listed = cluster.ray("list", "actors", "--filter", "class_name=RayTrainWorker", "--filter", "state=ALIVE",
                         "--format", "json")
    assert listed.returncode == 0, listed.stderr[-2000:]
    return [actor["pid"] for actor in json.loads(listed.stdout)]


def test_a_run_survives_a_killed_worker_and_counts_every_step_once(token_cluster, tmp_path, tiny_model_dir):
    # long enough that the kill lands mid-run: a tiny step takes ~0.1 s, and `ray list actors` and the log's
    # streaming take seconds (with 10 steps the run once ended before the kill reached it)
    steps = 60
    job_dir = write_job(tmp_path / "job", tiny_model_dir, tmp_path / "out", steps=steps)
    job = Streamed(token_cluster.command("job", "submit", *submit_args("finetune-worker-killed", job_dir)),
                   client_env(token_cluster.token))
    try:
        job.wait_for(f"step 1/{steps} loss", timeout=180)
        pids = _train_worker_pids(token_cluster)
        assert len(pids) == 2, pids
        job.wait_for(f"step 3/{steps} loss", timeout=60)  # past the step-2 checkpoint
        # and Ray Train's controller has registered it (it writes this snapshot when it does): a worker killed
        # before that would restart the run from step 1, without a checkpoint to go on from
        snapshot = tmp_path / "out" / "ray" / "finetune" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 60
        while not snapshot.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert snapshot.is_file(), f"no checkpoint registered:\n{job.text[-3000:]}"
        victim = pids[0]
        title = Path(f"/proc/{victim}/cmdline").read_bytes()
        assert title.startswith(b"ray::RayTrainWorker"), title[:80]  # not a recycled pid
        os.kill(victim, signal.SIGKILL)
        rc = job.finish(timeout=300)
    finally:
        job.stop()
    assert rc == 0, job.text[-4000:]
    assert f"fine-tuning completed: {steps} steps" in job.text
    assert "Job 'finetune-worker-killed' succeeded" in job.text  # the status `ray job submit` ends with

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "completed" and report["steps_completed"] == steps
    assert report["restarts"] >= 1, "no restart from a checkpoint (or the run had ended before the kill)"
    assert len(report["losses"]) == steps
    # every step printed (before the kill, and again where the restart redid it) has the loss the report holds:
    # the restored adapters and optimizer state replay the lost steps exactly
    printed = [(int(s), float(loss)) for s, total, loss in STEP_LINE.findall(job.text) if int(total) == steps]
    assert {s for s, _ in printed} == set(range(1, steps + 1))
    for step, loss in printed:
        assert loss == pytest.approx(report["losses"][step - 1], abs=1e-4), (step, loss, report["losses"])
