"""The structure of terraform/ that users rely on, read with python-hcl2 (no provider registry needed):
typed, described variables; pinned versions; GPU groups that scale to zero behind the GPU taint, with
the names the KubeRay manifests select."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = ROOT / "terraform"
EXACT_VERSION = re.compile(r"^=?\s*v?\d+\.\d+\.\d+$")
# The taint every GPU node carries, so only pods that tolerate it (the Ray GPU workers) land there
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "true", "effect": "NO_SCHEDULE"}
# The module arguments that list GPU groups, and the resource each module turns them into
GPU_GROUP_ARGS = ("gpu_node_groups", "gpu_node_pools")


def _rel(path: Path) -> Path:
    """A path as users see it: from the repository root when it lies inside it."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _unquote(s: str) -> str:
    return s[1:-1] if len(s) >= 2 and s[0] == s[-1] == '"' else s


def normalise(node: Any) -> Any:
    """python-hcl2's output without its quoting of names and strings and its block/comment markers."""
    if isinstance(node, dict):
        return {_unquote(k): normalise(v) for k, v in node.items()
                if k not in ("__is_block__", "__comments__", "__inline_comments__")}
    if isinstance(node, list):
        return [normalise(v) for v in node]
    return _unquote(node) if isinstance(node, str) else node


def parse(path: Path) -> dict:
    import hcl2

    with path.open() as f:
        return normalise(hcl2.load(f))


def _blocks(tree: dict, kind: str) -> list[tuple[str, dict]]:
    """(name, body) of each `kind` block ('variable', 'module', ...) in a parsed file."""
    return [(name, body) for entry in tree.get(kind, []) for name, body in entry.items()]


def _resources(tree: dict, rtype: str) -> list[tuple[str, dict]]:
    return [(name, body) for entry in tree.get("resource", []) for t, named in entry.items() if t == rtype
            for name, body in named.items()]


def first_block(body: Any, name: str) -> dict:
    """A nested block of `body` (python-hcl2 gives a list of one dict) or an object attribute; {} if absent."""
    value = body.get(name) if isinstance(body, dict) else None
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, dict) else {}


def walk(node: Any, trail: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(keys leading to it, value) of `node` and of every value under it; list indices are left out."""
    yield trail, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*trail, str(key)))
    elif isinstance(node, list):
        for value in node:
            yield from walk(value, trail)


def _bounded(constraint: str) -> bool:
    """A provider constraint that admits no future major version: `~>`, an exact version, or an upper bound."""
    return "~>" in constraint or "<" in constraint or bool(EXACT_VERSION.match(constraint.strip()))


def file_errors(path: Path, tree: dict) -> list[str]:
    where = _rel(path)
    errors = []
    for name, body in _blocks(tree, "variable"):
        if "type" not in body:
            errors.append(f"{where}: variable {name} has no type")
        if not str(body.get("description", "")).strip():
            errors.append(f"{where}: variable {name} has no description")
    for name, body in _resources(tree, "helm_release"):
        if not EXACT_VERSION.match(str(body.get("version", ""))):
            errors.append(f"{where}: helm_release {name} does not pin an exact chart version "
                          f"(version = {body.get('version')!r})")
    for name, body in _blocks(tree, "module"):
        source = str(body.get("source", ""))
        if not source.startswith(("./", "../")) and not EXACT_VERSION.match(str(body.get("version", ""))):
            errors.append(f"{where}: module {name} ({source}) does not pin an exact version")
    for block in tree.get("terraform", []):
        for providers in block.get("required_providers", []):
            for name, spec in providers.items():
                version = spec.get("version") if isinstance(spec, dict) else None
                if not version or not _bounded(str(version)):
                    errors.append(f"{where}: provider {name} needs a bounded version constraint, got {version!r}")
    return errors


def _gpu_groups(trees: dict[Path, dict]) -> list[tuple[Path, str, list[dict]]]:
    """(file, module, GPU groups) of every module call that lists GPU groups."""
    out = []
    for path, tree in trees.items():
        for name, body in _blocks(tree, "module"):
            for arg in GPU_GROUP_ARGS:
                if arg in body:
                    out.append((path, name, body[arg]))
    return out


def gpu_errors(trees: dict[Path, dict], expected_names: set[str] | None = None) -> list[str]:
    """Every GPU group an example asks for may scale to zero; the modules put the GPU taint on every GPU node
    group and pass the group's minimum through; `expected_names`: the node pools the manifests select."""
    errors = []
    calls = _gpu_groups(trees)
    if not calls:
        errors.append("no module call lists GPU groups (gpu_node_groups / gpu_node_pools)")
    for path, module, groups in calls:
        where = f"{_rel(path)}: module {module}"
        for g in groups if isinstance(groups, list) else []:
            if g.get("min_size") != 0:
                errors.append(f"{where}: GPU group {g.get('name')} has min_size {g.get('min_size')!r}, not 0")
        names = {g.get("name") for g in groups} if isinstance(groups, list) else set()
        if expected_names is not None and names != expected_names:
            errors.append(f"{where}: GPU groups {sorted(names)} are not the manifests' node pools "
                          f"{sorted(expected_names)}")
    by_module: dict[str, list[dict]] = {}
    for path, tree in trees.items():  # the cluster modules; the others hold no node groups
        if path.parent.parent.name == "modules" and path.parent.name.startswith("gpu-cluster"):
            by_module.setdefault(path.parent.name, []).append(tree)
    for module, module_trees in sorted(by_module.items()):
        errors += [f"modules/{module}: {e}" for e in _module_gpu_errors(module_trees)]
    return errors


def _module_gpu_errors(trees: list[dict]) -> list[str]:
    """The GPU node groups (EKS, built in a local) or node pools (GKE, a resource) of one module."""
    variables = {name: body for t in trees for name, body in _blocks(t, "variable")}
    gpu_vars = [n for n in GPU_GROUP_ARGS if n in variables]
    if not gpu_vars:
        return ["takes no GPU group variable"]
    errors = []
    conditions = " ".join(str(v.get("condition", "")) for v in variables[gpu_vars[0]].get("validation", []))
    if "min_size >= 0" not in conditions:
        errors.append(f"variable {gpu_vars[0]} does not validate min_size >= 0 (scale to zero)")
    pools = [body for t in trees for name, body in _resources(t, "google_container_node_pool") if name == "gpu"]
    local_groups = [body for t in trees for block in t.get("locals", []) for name, body in block.items()
                    if name == "gpu_node_groups"]
    local_taint = [body for t in trees for block in t.get("locals", []) for name, body in block.items()
                   if name == "gpu_taint"]
    if pools:
        for pool in pools:
            taints = [t for config in pool.get("node_config", []) for t in config.get("taint", [])]
            if GPU_TAINT not in taints:
                errors.append(f"GPU node pool lacks the taint {GPU_TAINT}")
            mins = [a.get("total_min_node_count", a.get("min_node_count")) for a in pool.get("autoscaling", [])]
            if mins != ["${each.value.min_size}"]:
                errors.append(f"GPU node pool autoscaling minimum is {mins}, not the group's min_size")
    elif local_groups:
        expr = str(local_groups[0])
        if local_taint != [GPU_TAINT] or "taints = {gpu = local.gpu_taint}" not in expr:
            errors.append(f"GPU node groups lack the taint {GPU_TAINT}")
        if "min_size = g.min_size" not in expr:
            errors.append("GPU node groups do not take the group's min_size")
    else:
        errors.append("no GPU node pool resource or gpu_node_groups local found")
    return errors


def applied_manifest_errors(trees: dict[Path, dict], k8s_dir: Path) -> list[str]:
    """The module that applies the manifests names them (`local.manifest_files`): every name must be a file
    under `k8s_dir`, and every manifest there must be applied (the vendored CRDs come with the operator's
    chart)."""
    shipped = {p.relative_to(k8s_dir).as_posix() for p in k8s_dir.rglob("*.yaml")
               if "crds" not in p.relative_to(k8s_dir).parts}
    applied: dict[Path, set[str]] = {}
    for path, tree in trees.items():
        for block in tree.get("locals", []):
            if "manifest_files" in block:
                names = set(re.findall(r'"([^"]+\.yaml)"', str(block["manifest_files"])))
                applied.setdefault(path.parent, set()).update(names)
    if not applied:
        return ["no module applies the manifests of infra/k8s (local.manifest_files)"]
    errors = []
    for module, names in sorted(applied.items()):
        where = _rel(module)
        errors += [f"{where}: applies {n}, which is not in infra/k8s" for n in sorted(names - shipped)]
        errors += [f"{where}: does not apply infra/k8s/{n}" for n in sorted(shipped - names)]
    return errors


def tf_files(root: Path = TERRAFORM_DIR) -> list[Path]:
    return sorted(p for p in root.rglob("*.tf") if ".terraform" not in p.parts)


def check_all(root: Path = TERRAFORM_DIR, expected_gpu_groups: set[str] | None = None,
              k8s_dir: Path = ROOT / "infra" / "k8s") -> tuple[int, list[str]]:
    """(files parsed, errors) over every .tf under `root`, and the rules across them; each example (a root
    module) must pin its Terraform version."""
    files = tf_files(root)
    trees, errors = {}, []
    for path in files:
        try:
            trees[path] = parse(path)
        except Exception as e:  # python-hcl2 raises lark's errors, of several types
            errors.append(f"{_rel(path)}: does not parse: {str(e).splitlines()[0]}")
    for path, tree in trees.items():
        errors += file_errors(path, tree)
    for example in sorted({p.parent for p in trees if p.parent.parent.name == "examples"}):
        pinned = [b for p, t in trees.items() if p.parent == example for b in t.get("terraform", [])
                  if b.get("required_version")]
        if not pinned:
            errors.append(f"{_rel(example)}: no terraform {{ required_version }}")
    errors += gpu_errors(trees, expected_gpu_groups)
    errors += applied_manifest_errors(trees, k8s_dir)
    return len(files), errors
