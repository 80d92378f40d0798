"""KubeRay manifests validate offline against the shared RayJob / RayCluster CRD schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import SHARED

K8S = Path(__file__).resolve().parents[1] / "k8s"
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def closed_schema(node):
    """Drop x-kubernetes-* keys and close every object that lists properties but no additionalProperties."""
    if isinstance(node, list):
        return [closed_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: closed_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((SHARED / "k8s-crds" / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = closed_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def ray_manifests() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in CRDS:
                docs.append((path, doc))
    return docs


def test_there_are_rayjob_and_raycluster_manifests():
    kinds = {doc["kind"] for _, doc in ray_manifests()}
    assert kinds == {"RayJob", "RayCluster"}


@pytest.mark.parametrize("path,doc", ray_manifests(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_manifest_matches_crd_schema(path: Path, doc: dict):
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, crd_schema(doc["kind"]))


def test_schema_check_catches_a_typo():
    path, doc = next((p, d) for p, d in ray_manifests() if d["kind"] == "RayJob")
    broken = copy.deepcopy(doc)
    broken["spec"]["entrypint"] = broken["spec"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError, match="entrypint"):
        jsonschema.validate(broken, crd_schema("RayJob"))


@pytest.mark.parametrize("path,doc", ray_manifests(), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_gpu_workers_have_shm_and_secret_credentials(path: Path, doc: dict):
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        assert {"secretRef": {"name": "videodpo-object-storage"}} in container["envFrom"]
        assert not any(env.get("name", "").startswith("AWS_") for env in container.get("env", []))
        if "nvidia.com/gpu" in container["resources"]["limits"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
            assert volume["emptyDir"]["medium"] == "Memory"


def test_rayjob_entrypoint_is_a_valid_train_command():
    """The RayJob's entrypoint names a real config and overrides that validate against TrainConfig."""
    import shlex

    from videodpo_ray.config import load_config
    from videodpo_ray.training.config import TrainConfig

    repo = K8S.parent
    for _, doc in ray_manifests():
        if doc["kind"] != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:3] == ["python", "-m", "jobs.train"]
        assert (repo / "jobs" / "train.py").is_file()
        config = load_config(TrainConfig, repo / argv[3], argv[4:])
        assert config.run.storage_path.startswith("s3://")
        assert config.model.family == "vc2" and config.model.finetune == "full"
