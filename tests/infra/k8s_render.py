"""Helpers for the infra tests: render kustomizations, walk pod templates, read the image's pins."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
DOCKERFILE = ROOT / "infra" / "docker" / "Dockerfile"
KUSTOMIZATIONS = ("base", "overlays/cpu-smoke", "overlays/gpu")  # the app: Ray clusters and MLflow
DATABASE = "database"  # MLflow's PostgreSQL, applied apart from the app


@functools.cache
def render(name: str) -> tuple[dict, ...]:
    """``kubectl kustomize`` output of infra/k8s/<name>, as documents."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: rendering the kustomizations needs it")
    proc = subprocess.run(
        [kubectl, "kustomize", str(K8S / name)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize infra/k8s/{name} failed:\n{proc.stderr}")
    return tuple(d for d in yaml.load_all(proc.stdout, Loader=yaml.CSafeLoader) if d)


def by_kind(docs: tuple[dict, ...], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def config_map(docs: tuple[dict, ...], name: str) -> dict:
    found = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"] == name]
    assert found, f"ConfigMap {name} is referenced but not rendered"
    return found[0]


@dataclass
class Pod:
    """One pod template of a rendered resource; ``role`` is head, worker, submitter, server or database."""

    where: str
    role: str
    spec: dict
    replicas: int
    labels: dict  # the pod's labels: its template's, and those KubeRay adds that policies select on


def cluster_spec(doc: dict) -> dict | None:
    if doc["kind"] == "RayJob":
        return doc["spec"]["rayClusterSpec"]
    if doc["kind"] == "RayCluster":
        return doc["spec"]
    return None


def pods(doc: dict) -> Iterator[Pod]:
    name = f"{doc['kind']}/{doc['metadata']['name']}"

    def labels(template: dict, **added: str) -> dict:
        return {**template.get("metadata", {}).get("labels", {}), **added}

    if doc["kind"] in ("Deployment", "StatefulSet"):
        role = "server" if doc["kind"] == "Deployment" else "database"
        template = doc["spec"]["template"]
        yield Pod(name, role, template["spec"], doc["spec"].get("replicas", 1), labels(template))
        return
    cluster = cluster_spec(doc)
    if cluster is None:
        return
    head = cluster["headGroupSpec"]["template"]
    yield Pod(f"{name} head", "head", head["spec"], 1, labels(head, **{"ray.io/node-type": "head"}))
    for group in cluster.get("workerGroupSpecs", []):
        where = f"{name} worker group {group['groupName']}"
        template = group["template"]
        node = {"ray.io/node-type": "worker"}
        yield Pod(where, "worker", template["spec"], group.get("replicas", 1), labels(template, **node))
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        template = doc["spec"]["submitterPodTemplate"]
        yield Pod(f"{name} submitter", "submitter", template["spec"], 1, labels(template))


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (``250m``, ``2``, ``3Gi``) as a number of units."""
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    assert match and (match[2] == "" or match[2] in suffixes), f"unsupported quantity {value!r}"
    return float(match[1]) * suffixes.get(match[2], 1)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pinned(package: str) -> str:
    """The ``==`` pin of a dependency in pyproject.toml."""
    deps = _project()["dependencies"]
    for dep in deps:
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if match:
            return match[2]
    raise AssertionError(f"pyproject.toml pins no {package}==...")


def python_tag_of_requires_python() -> str:
    """``py311`` for ``>=3.11,<3.12``: the one Python the project supports, as Ray image tags spell it."""
    match = re.fullmatch(r">=\s*3\.(\d+)\s*,\s*<\s*3\.(\d+)", _project()["requires-python"])
    assert match and int(match[2]) == int(match[1]) + 1, "requires-python should allow one minor version"
    return f"py3{match[1]}"


def dockerfile_args() -> dict[str, str]:
    """Default values of the Dockerfile's ARGs (the first declaration of each)."""
    args: dict[str, str] = {}
    for match in re.finditer(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.M):
        args.setdefault(match[1], match[2])
    return args


def dockerfile_directive(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+?)\s*$", DOCKERFILE.read_text(), flags=re.M)


def image_tag(name: str) -> str:
    """The tag of the flava-ray image in infra/k8s/<name>'s own ``images:`` entry."""
    kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    (entry,) = [i for i in kustomization.get("images", []) if i["name"] == "flava-ray"]
    return entry["newTag"]
