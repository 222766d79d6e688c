"""The commands the deployment files run, parsed by the programs' own parsers, and the ports their health
checks call against the ports those commands listen on. Why: `docker compose config`, hadolint and the
Kubernetes schemas accept any command and any port, so a renamed flag, a subcommand that moved, or a
probe on the wrong port would pass every other check and first show as a container that never starts or
a pod that never turns ready."""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aeic.receiver import cli as receiver_cli
from aeic.sender import cli as sender_cli

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s"
SCRIPTS = {"aeic-provision": ROOT / "deploy/docker/provision.sh", "aeic-edge-sim": ROOT / "deploy/docker/edge-sim.sh"}
# Shell values the scripts pass, as the scripts set them (edge-sim.sh's defaults).
SHELL_VALUES = {"$rate": "0", "$photo": "/opt/aeic/samples/astronaut.png"}


def _parse(argv: list[str]) -> argparse.Namespace:
    """argv as its program parses it (argparse exits with status 2 on a flag or subcommand it lacks)."""
    program, words = Path(argv[0]).name, argv[1:]
    if program == "aeic-receiver":
        return receiver_cli._parser().parse_args(words)
    if program == "aeic-send":
        return sender_cli.build_parser().parse_args(sender_cli._with_default_command(words))
    raise AssertionError(f"{program}: not a program the deployment files should run")


def _compose_services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def _k8s(kind: str) -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc and doc.get("kind") == kind]


def _k8s_containers() -> Iterator[tuple[str, dict, dict]]:
    """(where, container, its pod's labels) of every Deployment."""
    for doc in _k8s("Deployment"):
        pod = doc["spec"]["template"]
        for container in pod["spec"]["containers"]:
            yield f"{doc['metadata']['name']}/{container['name']}", container, pod["metadata"]["labels"]


def _script_commands(path: Path) -> Iterator[list[str]]:
    """The aeic-* command lines of a shell script, its variables replaced by the values it gives them."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        match = re.search(r"(?:^|[\s(])(aeic-(?:send|receiver)\s[^|;&>)]*)", line.split(" #")[0])
        if match and not line.lstrip().startswith("#"):
            words = shlex.split(match.group(1))
            yield [SHELL_VALUES.get(w, w) for w in words]


def _commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in _compose_services().items():
        command = service.get("command")
        if command and command[0] in SCRIPTS:
            yield from ((f"{name} ({command[0]})", words) for words in _script_commands(SCRIPTS[command[0]]))
        elif command and command[0].startswith("aeic-"):
            yield f"docker-compose.yml:{name}", command
    for where, container, _ in _k8s_containers():
        yield where, container["command"]
    for dockerfile in sorted((ROOT / "deploy/docker").glob("*.Dockerfile")):
        cmd = re.search(r"^CMD (\[.*\])$", dockerfile.read_text(), re.MULTILINE)
        assert cmd is not None, dockerfile.name
        yield dockerfile.name, yaml.safe_load(cmd.group(1))


def test_every_command_the_deployment_runs_parses() -> None:
    commands = list(_commands())
    assert len(commands) >= 8, commands  # compose api and worker, a line of each script, 2 in k8s, 2 CMDs
    for where, argv in commands:
        if argv[1:] == ["--help"]:
            continue
        try:
            _parse(argv)
        except SystemExit as exc:
            pytest.fail(f"{where}: `{shlex.join(argv)}` is refused by its parser (status {exc.code})")


def test_the_scripts_compose_runs_are_the_ones_the_images_install() -> None:
    images = "".join(path.read_text() for path in (ROOT / "deploy/docker").glob("*.Dockerfile"))
    for name, path in SCRIPTS.items():
        assert f"{path.relative_to(ROOT)} /usr/local/bin/{name}" in images, name
        assert any(service.get("command", [None])[0] == name for service in _compose_services().values()), name


def _port(argv: list[str]) -> int:
    """The port a receiver command listens on: serve's --port or the worker's --metrics-port."""
    args = _parse(argv)
    port = args.port if args.command == "serve" else args.metrics_port
    assert port is not None, f"`{shlex.join(argv)}` serves no health endpoint"
    return int(port)


def test_compose_health_checks_call_the_port_their_service_listens_on() -> None:
    for name, service in _compose_services().items():
        check = " ".join(service.get("healthcheck", {}).get("test", []))
        url = re.search(r"http://127\.0\.0\.1:(\d+)/(\w+)", check)
        if url is None:
            continue
        assert int(url.group(1)) == _port(service["command"]), name
        assert url.group(2) in ("healthz", "readyz"), name


def test_k8s_probes_and_services_reach_the_port_the_container_listens_on() -> None:
    services = _k8s("Service")
    for where, container, labels in _k8s_containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [_port(container["command"])], where
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                port = container[probe]["httpGet"]["port"]
                assert ports.get(port, port) in ports.values(), f"{where} {probe}: port {port}"
        for service in services:
            if service["spec"]["selector"].items() <= labels.items():
                for port in service["spec"]["ports"]:
                    target = port["targetPort"]
                    assert ports.get(target, target) in ports.values(), f"{where}: Service port {target}"
