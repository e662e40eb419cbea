"""The cluster definitions in cluster/ checked offline: no Ray runtime, no cloud, no network.

Ray's own launcher validation for aws.yaml and gcp.yaml, the shape of the KubeRay manifests, and
consistency with the repository: one image name everywhere, entrypoints that parse with the
project's CLI and configs that load, image pins that satisfy pyproject.toml.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from sft_ray.cli import build_parser
from sft_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
REQUIREMENTS = CLUSTER / "requirements.txt"
# Pinned for the image but not dependencies of the package (the AWS autoscaler on the head needs boto3).
IMAGE_ONLY_PINS = {"boto3"}
SHARED_MOUNT = "/mnt/shared"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _one_doc(path: Path) -> dict:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: expected one document, got {len(docs)}"
    return docs[0]


def _dockerfile_image() -> str:
    names = re.findall(r"^# image: (\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert len(names) == 1, "cluster/Dockerfile must name its image once, as a line '# image: NAME'"
    return names[0]


def _pins() -> dict[str, Requirement]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in pins, f"cluster/requirements.txt pins {req.name} twice"
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{line}: pin it exactly (==)"
        pins[name] = req
    return pins


def _pinned_version(req: Requirement) -> Version:
    return Version(next(iter(req.specifier)).version)


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _docker_env(cfg: dict) -> dict[str, str]:
    env = {}
    for opt in cfg["docker"].get("run_options", []):
        flag, _, value = opt.partition(" ")
        if flag in ("--env", "-e"):
            key, _, val = value.strip().partition("=")
            env[key] = val
    return env


def _docker_volumes(cfg: dict) -> list[str]:
    return [
        opt.partition(" ")[2].strip()
        for opt in cfg["docker"].get("run_options", [])
        if opt.split(" ", 1)[0] in ("--volume", "-v")
    ]


def _pod_containers(cluster_spec: dict) -> list[tuple[str, dict]]:
    found = [("head", c) for c in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]]
    for group in cluster_spec["workerGroupSpecs"]:
        found += [(group["groupName"], c) for c in group["template"]["spec"]["containers"]]
    return found


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_from_secret(env: dict[str, dict], where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE must be token"
    token = env.get("RAY_AUTH_TOKEN", {})
    assert "value" not in token, f"{where}: RAY_AUTH_TOKEN must not be written in the manifest"
    ref = token.get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") and ref.get("key"), f"{where}: RAY_AUTH_TOKEN must come from a Secret"


def _entrypoints() -> list[tuple[str, str]]:
    """Every `python jobs/...` command shipped in cluster/: the RayJob's and the README's."""
    found = [("rayjob.yaml", _one_doc(RAYJOB)["spec"]["entrypoint"])]
    for n, line in enumerate((CLUSTER / "README.md").read_text().splitlines(), 1):
        if "python jobs/" in line:
            found.append((f"README.md:{n}", line[line.index("python jobs/") :]))
    return found


# ---------------------------------------------------------------- Ray cluster launcher configs


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    # What `ray up` does before it talks to the cloud (commands._bootstrap_config): merge the
    # provider's defaults and check docker/min-max settings (prepare_config), then the JSON schema
    # ray/autoscaler/ray-schema.json and the node-type rules (validate_config). The steps after
    # that (resource autodetection, provider bootstrap_config) call the cloud APIs, so they stop here.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(_yaml(path))))


def test_rays_validation_catches_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml(LAUNCHER_CONFIGS[0])
    typo = copy.deepcopy(cfg)
    typo["docker"]["run_option"] = typo["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(typo))
    wrong_head = copy.deepcopy(cfg)
    wrong_head["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(wrong_head))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_layout(path):
    cfg = _yaml(path)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU"), (
        "the head must offer no CPU/GPU so that data preparation and training land on the workers"
    )
    workers = {name: t for name, t in types.items() if name != cfg["head_node_type"]}
    assert len(workers) == 1
    (worker,) = workers.values()
    assert worker["resources"].get("GPU", 0) >= 1 and worker["resources"].get("CPU", 0) >= 1
    assert 0 <= worker["min_workers"] <= worker["max_workers"] <= cfg["max_workers"]
    assert worker["max_workers"] >= 1

    env = _docker_env(cfg)
    assert env.get("RAY_AUTH_MODE") == "token"
    token_dir = str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent)
    assert token_dir in cfg["file_mounts"], "the token file must be copied to every node (file_mounts)"

    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])

    # Shared storage: mounted on the host before the container starts, then bound into it.
    assert f"{SHARED_MOUNT}:{SHARED_MOUNT}" in _docker_volumes(cfg)
    init = " ".join(cfg["initialization_commands"])
    assert re.search(rf"mount -t nfs\S* .* {SHARED_MOUNT}\b", init), "no NFS mount of the shared folder"


def test_no_secret_is_written_in_cluster_files():
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text()
        assert not re.search(r"\b[0-9a-fA-F]{32,}\b", text), f"{path.name}: looks like a token"
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{path.name}: looks like an AWS key"


# ---------------------------------------------------------------- KubeRay manifests


def test_kuberay_kinds():
    for path, kind in [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")]:
        doc = _one_doc(path)
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind, path.name


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(lambda: _one_doc(RAYCLUSTER)["spec"], id="raycluster"),
        pytest.param(lambda: _one_doc(RAYJOB)["spec"]["rayClusterSpec"], id="rayjob"),
    ],
)
def test_kuberay_cluster_spec(spec):
    spec = spec()
    assert spec["rayVersion"] == str(_pinned_version(_pins()["ray"]))
    assert spec["enableInTreeAutoscaling"] is True
    _assert_token_from_secret(_env(spec["autoscalerOptions"]), "autoscaler sidecar")

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in pod["containers"]]
        if any(gpus):
            gpu_groups.append(group)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            assert group["maxReplicas"] >= 1
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert pod["nodeSelector"]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"

    for role, container in _pod_containers(spec):
        env = _env(container)
        _assert_token_from_secret(env, f"{role} container")
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{role}: {name} must come from a Secret"
        if role == "head":
            assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_rayjob_cluster_is_the_raycluster():
    assert _one_doc(RAYJOB)["spec"]["rayClusterSpec"] == _one_doc(RAYCLUSTER)["spec"]


def test_rayjob_submitter_has_the_token():
    spec = _one_doc(RAYJOB)["spec"]
    (container,) = spec["submitterPodTemplate"]["spec"]["containers"]
    _assert_token_from_secret(_env(container), "job submitter")


# ---------------------------------------------------------------- consistency with the repository


def test_one_image_everywhere():
    image = _dockerfile_image()
    assert image.rsplit(":", 1)[1] == _project()["version"], "image tag != pyproject version"
    version_label = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', DOCKERFILE.read_text())
    assert version_label and version_label[1] == _project()["version"]
    used = {f"{p.name} docker.image": _yaml(p)["docker"]["image"] for p in LAUNCHER_CONFIGS}
    for path, spec in [
        (RAYCLUSTER, _one_doc(RAYCLUSTER)["spec"]),
        (RAYJOB, _one_doc(RAYJOB)["spec"]["rayClusterSpec"]),
    ]:
        used.update({f"{path.name} {role}": c["image"] for role, c in _pod_containers(spec)})
    (submitter,) = _one_doc(RAYJOB)["spec"]["submitterPodTemplate"]["spec"]["containers"]
    used["rayjob.yaml submitter"] = submitter["image"]
    assert {where: name for where, name in used.items() if name != image} == {}


@pytest.mark.parametrize("where, command", _entrypoints(), ids=[w for w, _ in _entrypoints()])
def test_entrypoint_parses_and_its_config_loads(where, command, monkeypatch):
    monkeypatch.chdir(REPO)  # jobs run in the image's /app, a copy of the repository root
    argv = shlex.split(command)
    assert argv[0] == "python", where
    script, args = argv[1], argv[2:]
    assert (REPO / script).is_file(), f"{where}: {script} is not in the repository"
    ns = build_parser().parse_args(["train", *args])
    config = (REPO / ns.config).resolve()
    assert config.parent == REPO / "jobs" / "configs" and config.is_file(), f"{where}: {ns.config}"
    cfg = load_config(ns.config, ns.overrides)
    assert cfg.scaling.use_gpu, f"{where}: a GPU cluster entrypoint must set scaling.use_gpu=true"
    assert cfg.storage.path.startswith(("s3://", f"{SHARED_MOUNT}/")), (
        f"{where}: storage.path={cfg.storage.path} is not shared by the nodes"
    )


def test_at_least_one_entrypoint_per_way_to_run():
    text = " ".join(command for _, command in _entrypoints())
    assert "s3://" in text and f"storage.path={SHARED_MOUNT}/" in text


def test_dockerfile_builds_from_the_pinned_ray_and_installs_the_project():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-\S+$", text, flags=re.M)
    assert base and Version(base[1]) == _pinned_version(_pins()["ray"]), "base image Ray != ray pin"
    sources = {s for line in re.findall(r"^COPY (.+)$", text, flags=re.M) for s in line.split()[:-1]}
    sources = {s for s in sources if not s.startswith("--")}
    assert {"cluster/requirements.txt", "pyproject.toml", "README.md", "sft_ray", "jobs"} <= sources
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    assert re.search(r"^WORKDIR /app$", text, flags=re.M)
    assert "pip install --no-cache-dir -r cluster/requirements.txt" in text
    assert "pip install --no-cache-dir --no-deps -e ." in text


def test_image_pins_satisfy_pyproject():
    pins = _pins()
    declared = [Requirement(d) for d in _project()["dependencies"]]
    for dep in declared:
        name = canonicalize_name(dep.name)
        assert name in pins, f"cluster/requirements.txt does not pin {dep.name}"
        pin = pins[name]
        assert pin.extras == dep.extras, f"{dep.name}: extras {sorted(pin.extras)} != {sorted(dep.extras)}"
        assert dep.specifier.contains(_pinned_version(pin), prereleases=True), (
            f"{pin} does not satisfy pyproject's {dep}"
        )
    extra = set(pins) - {canonicalize_name(d.name) for d in declared}
    assert extra == IMAGE_ONLY_PINS, f"pins that are not dependencies: {sorted(extra)}"
