"""The KubeRay manifests in k8s/ validate offline: RayJob and RayCluster against the shared KubeRay CRDs with unknown
fields rejected, every core object and pod template against Kubernetes' own schemas (kubernetes-validate bundles
them), every kustomize overlay as rendered; entrypoints are real commands on valid configs; credentials come from the
Secret only."""

from __future__ import annotations

import copy
import functools
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUBERNETES_VERSION = "1.33"
SECRET = "videodpo-object-storage"
BASES = ("cluster", "generate", "pair", "train", "pipeline")
OVERLAYS = tuple(sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")))


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


@functools.cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    """The CRD's v1 schema, closed; one validator per kind (jsonschema.validate would re-check the schema per call)."""
    crd = yaml.safe_load((SHARED / "k8s-crds" / CRDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = closed_schema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.validators.validator_for(schema)(schema)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY` for what k8s/ uses: resources (files or directories) and inline JSON 6902 patches
    (add / replace) on a target kind and name."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}, f"{directory}: unsupported keys"
    docs = []
    for entry in kustomization["resources"]:
        path = directory / entry
        docs += render(path) if path.is_dir() else load_docs(path)
    for patch in kustomization.get("patches", []):
        targets = [d for d in docs if (d["kind"], d["metadata"]["name"]) == (patch["target"]["kind"],
                                                                             patch["target"]["name"])]
        assert targets, f"{directory}: patch target {patch['target']} matches nothing"
        for operation in yaml.safe_load(patch["patch"]):
            for doc in targets:
                apply_operation(doc, operation)
    return docs


def apply_operation(doc: dict, operation: dict) -> None:
    """One JSON 6902 add or replace."""
    assert operation["op"] in ("add", "replace"), operation
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].lstrip("/").split("/")]
    node: Any = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    value = copy.deepcopy(operation["value"])
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if operation["op"] == "add":
            node.insert(index, value)
        else:
            node[index] = value
    else:
        assert operation["op"] == "add" or last in node, f"replace of a missing key: {operation['path']}"
        node[last] = value


RENDERED = {name: render(K8S / name) for name in BASES} | {f"overlays/{n}": render(K8S / "overlays" / n)
                                                             for n in OVERLAYS}
FILES = {str(p.relative_to(K8S)): load_docs(p) for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"}
# every manifest file, and every overlay as rendered (a base renders to its files unchanged)
MANIFESTS = [(label, doc) for label, docs in FILES.items() for doc in docs] + [
    (label, doc) for label, docs in RENDERED.items() if label.startswith("overlays/") for doc in docs
]
RAY = [(label, doc) for label, doc in MANIFESTS if doc["kind"] in CRDS]
RAYJOBS = [(label, doc) for label, doc in RAY if doc["kind"] == "RayJob"]


def ids(value: Any) -> str:
    return value if isinstance(value, str) else value.get("kind", "")


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def gpus(doc: dict) -> int:
    """GPUs of the worker groups at their fixed size."""
    return sum(group["replicas"] * int(group["template"]["spec"]["containers"][0]["resources"]["limits"]
                                       .get("nvidia.com/gpu", 0)) for group in cluster_spec(doc)["workerGroupSpecs"])


def validate_kubernetes(doc: dict) -> None:
    """A core object against Kubernetes' schema (unknown fields rejected); a RayJob or RayCluster's pod templates."""
    if doc["kind"] not in CRDS:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    for template in pod_templates(doc):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(wrapped, KUBERNETES_VERSION, strict=True)


def test_bases_and_overlays_render_to_ray_objects():
    assert {doc["kind"] for docs in RENDERED.values() for doc in docs} == {"RayJob", "RayCluster"}
    assert {doc["metadata"]["name"] for _, doc in RAYJOBS} == {"videodpo-generate", "videodpo-pair", "videodpo-train",
                                                               "videodpo-pipeline"}
    assert OVERLAYS, "no kustomize overlay for GPU type, GPU count and bucket"
    for name in OVERLAYS:
        overlay = K8S / "overlays" / name
        base = (overlay / yaml.safe_load((overlay / "kustomization.yaml").read_text())["resources"][0]).resolve()
        assert RENDERED[f"overlays/{name}"] != render(base), f"overlay {name} changes nothing"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed: the renderer is not cross-checked")
@pytest.mark.parametrize("name", [*BASES, *(f"overlays/{n}" for n in OVERLAYS)])
def test_renderer_agrees_with_kubectl_kustomize(name: str):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / name)], capture_output=True, text=True, check=True).stdout
    key = lambda doc: (doc["kind"], doc["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(RENDERED[name], key=key)


@pytest.mark.parametrize("label,doc", RAY, ids=ids)
def test_ray_objects_match_crd_schema(label: str, doc: dict):
    assert doc["apiVersion"] == "ray.io/v1"
    crd_validator(doc["kind"]).validate(doc)


@pytest.mark.parametrize("label,doc", MANIFESTS, ids=ids)
def test_core_objects_and_pod_templates_match_kubernetes_schemas(label: str, doc: dict):
    validate_kubernetes(doc)


def test_broken_manifests_are_rejected():
    _, rayjob = RAYJOBS[0]
    typo = copy.deepcopy(rayjob)
    typo["spec"]["entrypint"] = typo["spec"].pop("entrypoint")
    with pytest.raises(jsonschema.ValidationError, match="entrypint"):
        crd_validator("RayJob").validate(typo)
    pod = copy.deepcopy(rayjob)
    container = cluster_spec(pod)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        validate_kubernetes(pod)
    secret = copy.deepcopy(FILES["object-storage-secret.example.yaml"][0])
    secret["stringData"]["AWS_DEFAULT_REGION"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="not of type 'string'"):
        validate_kubernetes(secret)


@pytest.mark.parametrize("label,doc", RAY, ids=ids)
def test_credentials_come_from_the_secret_only(label: str, doc: dict):
    for template in pod_templates(doc):
        for container in template["spec"]["containers"]:
            assert {"secretRef": {"name": SECRET}} in container["envFrom"]
            assert not any(env["name"].startswith("AWS_") for env in container.get("env", []))
    assert "AWS_" not in doc["spec"].get("runtimeEnvYAML", "")


def test_only_the_secret_template_names_keys_and_it_holds_placeholders():
    for label, docs in FILES.items():
        text = (K8S / label).read_text()
        if label != "object-storage-secret.example.yaml":
            assert "AWS_SECRET_ACCESS_KEY" not in text and "stringData" not in text, label
    secret = FILES["object-storage-secret.example.yaml"][0]
    assert all(value.startswith(("<", "https://<")) for key, value in secret["stringData"].items()
               if key != "AWS_DEFAULT_REGION")


@pytest.mark.parametrize("label,doc", RAY, ids=ids)
def test_head_schedules_nothing_and_gpu_workers_have_shm(label: str, doc: dict):
    spec = cluster_spec(doc)
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"] == {"mode": "token"}
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in spec["workerGroupSpecs"])
    head = spec["headGroupSpec"]["template"]["spec"]  # the driver's object store gathers the committed chunks
    head_mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    assert next(v for v in head["volumes"] if v["name"] == head_mounts["/dev/shm"])["emptyDir"]["medium"] == "Memory"
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        if "nvidia.com/gpu" not in resources["limits"]:
            continue
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"]
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        volume = next(v for v in pod["volumes"] if v["name"] == mounts["/dev/shm"])
        assert volume["emptyDir"]["medium"] == "Memory"


def test_raycluster_autoscales_gpu_workers_with_autoscaler_v2():
    (cluster,) = RENDERED["cluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"]["version"] == "v2"
    gpu = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]


@pytest.mark.parametrize("label,doc", RAYJOBS, ids=ids)
def test_rayjobs_retry_through_resume_and_are_bounded(label: str, doc: dict):
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 300  # GPUs freed
    assert spec["backoffLimit"] >= 1  # each retry is a new RayCluster: it resumes from storage
    if spec["entrypoint"].split()[1] in ("train", "run"):
        assert spec["backoffLimit"] == 1  # KubeRay retries a NaN stop too: once, not three times
    assert 0 < spec["activeDeadlineSeconds"] <= 7 * 24 * 3600


@pytest.mark.parametrize("label,doc", RAYJOBS, ids=ids)
def test_rayjob_entrypoint_is_a_valid_command_on_a_valid_config(label: str, doc: dict):
    """`videodpo-ray generate|pair|train|run CONFIG overrides`: the config exists, loads with the overrides, writes to
    object storage, and training uses the GPUs the job's workers have and the recipe's pairs per step."""
    from videodpo_ray.config import load_config
    from videodpo_ray.stages.generate import GenerateConfig
    from videodpo_ray.stages.pair import PairConfig
    from videodpo_ray.stages.pipeline import load_pipeline_config, train_config
    from videodpo_ray.training.config import TrainConfig

    program, command, config_path, *overrides = shlex.split(doc["spec"]["entrypoint"])
    assert program == "videodpo-ray" and (REPO / config_path).is_file()
    path = REPO / config_path
    if command == "generate":
        assert load_config(GenerateConfig, path, overrides).out.startswith("s3://")
        return
    if command == "pair":
        assert load_config(PairConfig, path, overrides).pairs_root.startswith("s3://")
        return
    assert command in ("train", "run"), command
    if command == "train":
        trained = load_config(TrainConfig, path, overrides)
        assert trained.pairs_per_step == load_config(TrainConfig, path).pairs_per_step  # more GPUs, the same steps
    else:
        pipeline = load_pipeline_config(path, overrides)
        assert pipeline.out.startswith("s3://")
        trained = train_config(pipeline)
    assert trained.run.storage_path.startswith("s3://") and trained.scaling.use_gpu
    workers, available = trained.scaling.num_workers, gpus(doc)
    assert workers == available if command == "train" else workers <= available, (workers, available)


def test_generate_pair_and_train_jobs_hand_over_one_dataset():
    """k8s/generate writes the samples and scores k8s/pair reads, and k8s/train reads the pairs k8s/pair writes."""
    from videodpo_ray.config import load_config
    from videodpo_ray.stages.generate import GenerateConfig
    from videodpo_ray.stages.pair import PairConfig
    from videodpo_ray.training.config import TrainConfig

    def loaded(name: str, config_class: type) -> Any:
        (doc,) = RENDERED[name]
        _, _, config_path, *overrides = shlex.split(doc["spec"]["entrypoint"])
        return load_config(config_class, REPO / config_path, overrides)

    generated, paired = loaded("generate", GenerateConfig), loaded("pair", PairConfig)
    assert generated.out == paired.data and paired.pairs_root == loaded("train", TrainConfig).data.pairs_url


def test_the_image_the_manifests_run_is_built_from_the_repository():
    """Every Ray container runs the image the README's `docker build` line tags, and the Dockerfile copies what a
    job needs (the packages, configs) from paths that exist."""
    images = {container["image"] for _, doc in RAY for template in pod_templates(doc)
              for container in template["spec"]["containers"]}
    assert len(images) == 1
    (image,) = images
    assert f"docker build -t {image} ." in (REPO / "README.md").read_text()
    copied = [line.split()[1] for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("COPY")]
    assert {"videodpo_ray", "actors", "jobs", "configs", "pyproject.toml"} <= set(copied)
    assert all((REPO / path).exists() for path in copied)

