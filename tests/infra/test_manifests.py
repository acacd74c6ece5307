"""The KubeRay and Kubernetes manifests under infra/k8s: valid against the vendored KubeRay CRDs and
Kubernetes' own schemas, strictly, and consistent with what expertmesh itself renders and asks for."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from expertmesh.graph.deployment import DeploymentConfig
from infra.check import crd, manifests

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
# The arguments the shipped Serve config is rendered with (`make serve-config`)
SERVE_ARGS = ["--model", "/models/default", "--served-model-name", "expertmesh", "--dtype", "bfloat16",
              "--deployment", "infra/serve/deployment-gpu.yaml", "--host", "0.0.0.0", "--port", "8000",
              "--min-replicas", "1", "--max-replicas", "2"]
IMAGE = "expertmesh:0.1.0"  # the Terraform examples replace exactly this string with the pushed image


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


def test_every_manifest_is_valid():
    count, errors = manifests.check_all()
    assert errors == []
    assert count >= 8  # PVC, loader Job, NetworkPolicy, RayService, ConfigMap + RayJob, 2 PodMonitors


def _service() -> dict:
    return _one("rayservice.yaml", "RayService")


def _broken(edit) -> dict:
    doc = copy.deepcopy(_service())
    edit(doc)
    return doc


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["spec"].pop("rayClusterConfig"), "'rayClusterConfig' is a required property"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].pop("groupName"),
     "workerGroupSpecs.1: 'groupName' is a required property"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"].update(nodeSelecter={}),
     "'nodeSelecter' was unexpected"),
    (lambda d: d["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("name"),
     "containers.0: 'name' is a required property"),
    (lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].update(maxReplicas="two"),
     "maxReplicas: 'two' is not of type 'integer'"),
    (lambda d: d["spec"].update(serveConfig=d["spec"]["serveConfigV2"]), "'serveConfig' was unexpected"),
    (lambda d: d["metadata"].update(labelz={}), "'labelz' was unexpected"),
    (lambda d: d["metadata"].update(name="Expert_Mesh"), "not a DNS subdomain name"),
])
def test_a_broken_rayservice_is_refused_naming_the_field(edit, needle):
    errors = crd.validate(_broken(edit))
    assert any(needle in e for e in errors), errors


def test_a_broken_core_object_is_refused():
    job = copy.deepcopy(_one("model-loader-job.yaml", "Job"))
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errors = manifests.validate(manifests.Manifest(K8S / "model-loader-job.yaml", 0, job))
    assert any("'imagePullPolicyy' was unexpected" in e for e in errors), errors
    pvc = copy.deepcopy(_one("models-pvc.yaml", "PersistentVolumeClaim"))
    pvc["spec"]["resources"]["requests"]["storage"] = ["1Ti"]
    assert manifests.validate(manifests.Manifest(K8S / "models-pvc.yaml", 0, pvc))


def test_strict_schema_follows_the_api_server():
    """Structural-schema rules the API server applies and plain jsonschema does not."""
    schema = {"type": "object", "required": ["mode"], "properties": {
        "mode": {"type": "string", "default": "serve"},
        "port": {"x-kubernetes-int-or-string": True},
        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "empty": {"type": "object"},
        "maybe": {"type": "string", "nullable": True},
    }}
    strict = crd.strict_schema(schema)
    import jsonschema

    def errors(instance):
        instance = crd.apply_defaults(schema, copy.deepcopy(instance))
        return [e.message for e in jsonschema.Draft7Validator(strict).iter_errors(instance)]

    assert errors({}) == []  # the default satisfies `required`
    assert errors({"port": 8000, "extra": {"anything": [1]}, "maybe": None}) == []
    assert errors({"port": "http"}) == []
    assert errors({"port": 1.5})
    assert errors({"typo": 1}) == ["Additional properties are not allowed ('typo' was unexpected)"]
    assert errors({"empty": {"x": 1}})  # an object with no declared fields holds none


def test_serve_config_is_rendered_by_expertmesh():
    """The manifests carry what `expertmesh serve --print-serve-config` renders, so they cannot drift from the
    CLI's deployment config."""
    rendered = yaml.safe_load(subprocess.run(
        [sys.executable, "-m", "expertmesh", "serve", *SERVE_ARGS, "--print-serve-config"],
        capture_output=True, text=True, timeout=120, check=True, cwd=ROOT).stdout)
    assert yaml.safe_load(_service()["spec"]["serveConfigV2"]) == rendered
    assert yaml.safe_load((ROOT / "infra" / "serve" / "serve-config.yaml").read_text()) == rendered
    deployment = yaml.safe_load((ROOT / "infra" / "serve" / "deployment-gpu.yaml").read_text())
    assert rendered["applications"][0]["args"]["deployment"] == deployment
    finetune = _one("rayjob-finetune.yaml", "ConfigMap")["data"]
    assert yaml.safe_load(finetune["deployment.yaml"]) == deployment


def _groups(doc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in manifests.cluster_spec(doc)["workerGroupSpecs"]}


def _container(template: dict) -> dict:
    (container,) = template["spec"]["containers"]
    return container


def _quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def test_every_role_of_the_graph_fits_a_worker_group_that_advertises_it():
    """Each actor asks for custom resources that one worker group advertises per pod, and that group's pods
    have the CPUs and GPUs the actor asks for; the groups can grow to hold a whole graph for each of the
    most Serve replicas the autoscaling config allows (each replica drives a graph of its own)."""
    (app,) = yaml.safe_load(_service()["spec"]["serveConfigV2"])["applications"]
    d = DeploymentConfig.from_dict(app["args"]["deployment"])
    (serve_deployment,) = app["deployments"]
    graphs = serve_deployment["autoscaling_config"]["max_replicas"]
    assert graphs == 2
    groups = _groups(_service())
    roles = [(d.attention_resources, d.attention_actors * graphs), (d.router_resources, graphs),
             (d.shard_resources, d.shard_actors * graphs)]
    need: dict[str, float] = {}
    for resources, count in roles:
        (name, group), = [(n, g) for n, g in groups.items()
                          if resources.resources and all(k in g.get("resources", {}) for k in resources.resources)]
        limits = _container(group["template"])["resources"]["limits"]
        assert float(limits.get("nvidia.com/gpu", 0)) >= resources.num_gpus, name
        for key, amount in resources.resources.items():
            assert float(group["resources"][key]) >= amount, (name, key)
            need[key] = need.get(key, 0) + amount * count
            assert need[key] <= float(group["resources"][key]) * group["maxReplicas"], (name, key)
        need[name] = need.get(name, 0) + resources.num_cpus * count
        assert need[name] <= _quantity(limits["cpu"]) * group["maxReplicas"], name
    assert d.cluster_autoscales  # the GPU groups start from zero pods


def test_gpu_groups_scale_from_zero_on_their_own_tainted_nodes():
    for doc in (_service(), _one("rayjob-finetune.yaml", "RayJob")):
        for name, group in _groups(doc).items():
            spec = group["template"]["spec"]
            assert "nvidia.com/gpu" in _container(group["template"])["resources"]["limits"], name
            assert group["minReplicas"] == 0, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["nodeSelector"] == {"expertmesh.io/pool": name}  # the Terraform node groups' label


def test_finetune_job_runs_on_the_serving_cluster_shape():
    """The RayJob's cluster is the RayService's, but for the Serve readiness probes (no Serve app there) and
    the writable models volume plus the job's config."""
    def comparable(cluster: dict) -> dict:
        cluster = copy.deepcopy(cluster)
        for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
            container = _container(template)
            container.pop("readinessProbe", None)
            container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "config"]
            for m in container["volumeMounts"]:
                m.pop("readOnly", None) if m["name"] == "models" else None
            template["spec"]["volumes"] = [v for v in template["spec"]["volumes"] if v["name"] != "config"]
            for v in template["spec"]["volumes"]:
                if v["name"] == "models":
                    v["persistentVolumeClaim"].pop("readOnly", None)
        return cluster

    job = _one("rayjob-finetune.yaml", "RayJob")
    assert comparable(job["spec"]["rayClusterSpec"]) == comparable(_service()["spec"]["rayClusterConfig"])
    assert job["spec"]["entrypoint"].startswith("python -m expertmesh.jobs.finetune --config /etc/expertmesh/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_versions_and_images_match_the_package():
    images = []
    for path in manifests.manifest_files():
        for doc in _docs(path.relative_to(K8S).as_posix()):
            for _, template in manifests.pod_templates(doc):
                images.append(_container(template)["image"])
            if doc["kind"] == "Job":
                images.append(_container(doc["spec"]["template"])["image"])
            if doc["kind"] in ("RayService", "RayJob"):
                assert manifests.cluster_spec(doc)["rayVersion"] == ray.__version__
    assert images and set(images) == {IMAGE}
    import expertmesh

    assert IMAGE == f"expertmesh:{expertmesh.__version__}"


def test_a_monitor_that_scrapes_a_port_no_pod_has_is_caught():
    monitors = [m.doc for m in manifests.load(manifests.manifest_files()) if m.doc["kind"] == "PodMonitor"]
    targets = [_service(), _one("rayjob-finetune.yaml", "RayJob")]
    assert monitors and all(manifests.monitor_errors(m, targets) == [] for m in monitors)
    monitor = monitors[0]
    broken = copy.deepcopy(monitor)
    broken["spec"]["podMetricsEndpoints"][0]["port"] = "metrix"
    assert any("'metrix' is not a port" in e for e in manifests.monitor_errors(broken, targets))
    broken = copy.deepcopy(monitor)
    broken["spec"]["selector"]["matchLabels"] = {"app": "nothing"}
    assert any("selects no Ray pod" in e for e in manifests.monitor_errors(broken, targets))
