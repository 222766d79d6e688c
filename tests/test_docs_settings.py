"""The settings the documentation and the deployment files name, against the code that reads them.

docs/receiver.md's Configuration table and deploy/sender/README.md's Config file table must list every
setting of `ReceiverSettings` and `SenderConfig`, no other, with the default the code has and the flags
the parsers have; the sample configs must load; the compose files, the Kubernetes ConfigMap and Secret,
the Dockerfiles and the systemd unit must set only variables their program reads, with values it takes;
every `AEIC_*` variable a document names must be one some code reads, and every one a program reads by
name must be documented.

Why: an operator configures the system from these pages and files. A setting that was renamed, added
or given another default in the code kept its old line in the docs, and a misspelt variable in a
deployment file is ignored without a word (a receiver refuses only near misses of its own names).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import yaml
from aeic.receiver import cli as receiver_cli
from aeic.receiver.settings import ReceiverSettings, closest_setting, load_settings
from aeic.sender import cli as sender_cli
from aeic.sender.config import CONFIG_ENV as SENDER_CONFIG_ENV
from aeic.sender.config import ENV_PREFIX, SenderConfig, load_config, misspelt_variables
from aeic.shared.model_package import ModelPackageError
from pydantic import SecretStr
from pydantic.fields import FieldInfo

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECEIVER_DOC = ROOT / "docs" / "receiver.md"
SENDER_DOC = ROOT / "deploy" / "sender" / "README.md"
SENDER_TOML = ROOT / "deploy" / "sender" / "sender.toml"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]

RECEIVER_VARS = {"AEIC_" + name.upper() for name in ReceiverSettings.model_fields}
SENDER_VARS = {ENV_PREFIX + key.upper() for key in SenderConfig.model_fields}
# Read outside the settings models: the receiver's config file, and the default model package of both
# sides (shared/model_package.py: default_model_dir), which the receiver's empty `model_packages` means.
RECEIVER_EXTRA_VARS = {"AEIC_CONFIG", "AEIC_MODEL"}
SENDER_EXTRA_VARS = {SENDER_CONFIG_ENV}
# The compose demo's edge simulator script reads its token from this file (deploy/docker/edge-sim.sh).
EDGE_SIM_VARS = {"AEIC_TOKEN_FILE"}

# Defaults the code leaves empty (None, []) and resolves when used: the words a table gives for them.
RECEIVER_RESOLVED = {
    "database_url": "`sqlite:///<data_dir>/receiver.db`",
    "model_packages": "the folder `AEIC_MODEL` names, else the shipped package",
}
SENDER_RESOLVED = {
    "ca_bundle": "system store",
    "model": "shipped model",
    "provider": "CPU",
    "threads": "onnxruntime's",
    "rate": str(sender_cli.DEFAULT_RATE),  # `_rate_control`: no rate and no budget is DEFAULT_RATE
}


# -- the tables --------------------------------------------------------------------------------------


def _section(doc: Path, heading: str) -> str:
    """The text under `heading` up to the next heading of its level or above."""
    text = doc.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    level = heading.split(" ")[0]
    rest = text[start + len(heading) + 2:]
    end = re.search(rf"\n#{{1,{len(level)}}} ", rest)
    return rest[: end.start()] if end else rest


def _rows(section: str) -> Iterator[list[str]]:
    """The cells of each body row of the tables in `section` (rows whose first cell names a setting)."""
    for line in section.splitlines():
        if line.startswith("| `"):
            yield [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # `\|` is in a cell


def _spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _receiver_table() -> dict[str, tuple[str, list[str]]]:
    """setting -> (its default cell, the flags named beside it)."""
    table: dict[str, tuple[str, list[str]]] = {}
    for cells in _rows(_section(RECEIVER_DOC, "## Configuration")):
        names = _spans(cells[0].split("(")[0])  # then (`--flag`, a note)
        flags = [span for span in _spans(cells[0]) if span.startswith("--")]
        if len(names) == 1:
            table[names[0]] = (cells[1], flags)
            continue
        defaults = _spans(cells[1])
        assert len(defaults) == len(names) and not flags, f"row {cells[0]}: one default per name"
        table.update({name: (f"`{default}`", []) for name, default in zip(names, defaults)})
    return table


def _sender_table() -> dict[str, tuple[str, list[str]]]:
    """key -> (its default cell, its flag column's flags)."""
    return {_spans(cells[0])[0]: (cells[2], _spans(cells[1])) for cells in _rows(_section(SENDER_DOC, "## Config file"))}


def _default(field: FieldInfo) -> object:
    return field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]


def _first_value(cell: str) -> str:
    """`2359296` (1536x1536) -> 2359296; 30 -> 30."""
    spans = _spans(cell)
    return spans[0] if cell.startswith("`") else cell.split()[0]


def _agrees(cell: str, value: object, resolved: str | None) -> bool:
    """Whether a table's default cell says the code's default `value`."""
    if value is None or value == []:
        if resolved is not None:
            return cell.startswith(resolved)
        return cell.split()[0].lower() in ("none", "unset")
    shown = _first_value(cell)
    if isinstance(value, bool):
        return shown == str(value).lower()
    if isinstance(value, (int, float)):
        return re.fullmatch(r"-?\d+(\.\d+)?", shown) is not None and float(shown) == float(value)
    if isinstance(value, Path):
        return Path(shown).expanduser() == value
    return shown == str(value)


def _check_table(table: Mapping[str, tuple[str, list[str]]], fields: Mapping[str, FieldInfo],
                 resolved: Mapping[str, str]) -> list[str]:
    wrong = [f"`{name}` is documented but is not a setting" for name in table if name not in fields]
    wrong += [f"`{name}` is a setting but is not documented" for name in fields if name not in table]
    for name, (cell, _) in table.items():
        if name in fields and not _agrees(cell, _default(fields[name]), resolved.get(name)):
            wrong.append(f"`{name}`: the docs say {cell!r}, the code's default is {_default(fields[name])!r}")
    return wrong


def test_the_receiver_table_lists_every_setting_with_its_default() -> None:
    table = _receiver_table()
    assert len(table) > 20, "the table extraction broke"
    wrong = _check_table(table, ReceiverSettings.model_fields, RECEIVER_RESOLVED)
    assert not wrong, "docs/receiver.md, Configuration:\n" + "\n".join(wrong)


def test_the_sender_table_lists_every_key_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)  # the spool's documented default is without it
    table = _sender_table()
    assert len(table) > 20, "the table extraction broke"
    wrong = _check_table(table, SenderConfig.model_fields, SENDER_RESOLVED)
    assert not wrong, "deploy/sender/README.md, Config file:\n" + "\n".join(wrong)


def test_the_resolved_defaults_are_what_the_tables_say(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults the code resolves when used: the SQLite file in the data directory, the package
    `AEIC_MODEL` names for an empty `model_packages`, and rate `DEFAULT_RATE` without rate or budget."""
    from aeic.receiver.registry import CodecRegistry

    settings = ReceiverSettings(data_dir=tmp_path)
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path.resolve() / 'receiver.db'}"
    monkeypatch.setenv("AEIC_MODEL", str(tmp_path))
    with pytest.raises(ModelPackageError, match=re.escape(str(tmp_path))):
        CodecRegistry.from_packages(settings.model_packages)
    assert sender_cli._rate_control(SenderConfig()).rate == sender_cli.DEFAULT_RATE


def _options(parsers: list[argparse.ArgumentParser]) -> dict[str, set[str]]:
    """option -> the destinations it sets in `parsers`."""
    found: dict[str, set[str]] = {}
    for parser in parsers:
        for action in parser._actions:
            for option in action.option_strings:
                found.setdefault(option, set()).add(action.dest)
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _check_flags(table: Mapping[str, tuple[str, list[str]]], options: Mapping[str, set[str]],
                 fields: Mapping[str, FieldInfo], dest_setting: Mapping[str, str]) -> list[str]:
    """Each documented flag sets its row's setting, and each flag that sets a setting is documented there."""
    wrong = []
    for name, (_, flags) in table.items():
        for flag in flags:
            dests = {dest_setting.get(dest, dest) for dest in options.get(flag, set())}
            if dests != {name}:
                wrong.append(f"`{name}` (`{flag}`): the flag sets {sorted(dests) or 'nothing'}")
    for flag, dests in sorted(options.items()):
        for setting in {dest_setting.get(dest, dest) for dest in dests} & set(fields):
            if flag not in table.get(setting, ("", []))[1]:
                wrong.append(f"`{flag}` sets `{setting}`, but its row does not name it")
    return wrong


def test_every_receiver_flag_of_a_setting_is_in_its_row() -> None:
    commands = _subparsers(receiver_cli._parser())
    # `token create --device` names a device, not the decoder's torch device: only serve and worker
    # take settings. `--data` is `data_dir` (`_settings`).
    options = _options([commands["serve"], commands["worker"]])
    wrong = _check_flags(_receiver_table(), options, ReceiverSettings.model_fields, {"data": "data_dir"})
    assert not wrong, "docs/receiver.md, Configuration:\n" + "\n".join(wrong)


def test_every_sender_flag_of_a_key_is_in_its_row() -> None:
    options = _options(list(_subparsers(sender_cli.build_parser()).values()))
    wrong = _check_flags(_sender_table(), options, SenderConfig.model_fields, {})
    assert not wrong, "deploy/sender/README.md, Config file:\n" + "\n".join(wrong)


# -- the sample configs --------------------------------------------------------------------------------


def _clear_aeic_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.upper().startswith("AEIC_"):
            monkeypatch.delenv(name)


def test_the_receiver_doc_examples_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example config file and the list-valued variable of docs/receiver.md, as an operator copies them."""
    _clear_aeic_environment(monkeypatch)
    section = _section(RECEIVER_DOC, "## Configuration")
    example = re.search(r"```toml\n(.*?)```", section, re.DOTALL)
    assert example is not None, "the example config file is gone"
    config = tmp_path / "receiver.toml"
    config.write_text(example.group(1), encoding="utf-8")
    settings = load_settings(config)
    written = tomllib.loads(example.group(1))
    assert written, "the example config file is empty"
    for key, value in written.items():  # each value is the file's, read as its setting's type
        loaded = getattr(settings, key)
        expected = [Path(v) for v in value] if key == "model_packages" else Path(value) if isinstance(
            loaded, Path) else value
        assert loaded == expected, key

    variable = re.search(r"`(AEIC_MODEL_PACKAGES)='(.*?)'`", section)
    assert variable is not None, "the list-valued variable example is gone"
    monkeypatch.setenv(variable.group(1), variable.group(2))
    assert load_settings().model_packages == [Path(p) for p in tomllib.loads(f"v = {variable.group(2)}")["v"]]


def test_every_key_in_the_sample_sender_config_is_a_key_commented_out_too() -> None:
    """deploy/sender/sender.toml's active keys load; those shown commented out (`# model = ...`,
    `# or: rate = 2`) are keys too, or uncommenting one is an error on a device."""
    text = SENDER_TOML.read_text(encoding="utf-8")
    load_config({}, SENDER_TOML, {})
    commented = re.findall(r"#(?: or:)? ([a-z_]+) = ", text)
    assert len(commented) >= 4, "the commented keys' extraction broke"
    unknown = sorted(set(commented) - set(SenderConfig.model_fields))
    assert not unknown, f"deploy/sender/sender.toml shows keys that do not exist: {unknown}"


# -- the deployment files ------------------------------------------------------------------------------


def _compose_default(value: object) -> str:
    """`${POSTGRES_PASSWORD:-aeic-demo-db}` -> aeic-demo-db: the value compose gives with nothing set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))


def _compose_environments() -> Iterator[tuple[str, str, dict[str, str]]]:
    """(where, program, environment) of each aeic service of the compose files; the GPU override's
    services take their image from the base file's."""
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    gpu = yaml.safe_load((ROOT / "deploy/docker/compose.gpu.yml").read_text(encoding="utf-8"))["services"]
    for where, services in (("docker-compose.yml", base), ("deploy/docker/compose.gpu.yml", gpu)):
        for name, service in services.items():
            image = str(service.get("image") or base[name].get("image", ""))
            program = "receiver" if image.startswith("aeic-receiver:") else "sender" if image.startswith(
                "aeic-sender:") else None
            if program is not None:
                environment = dict(base[name].get("environment", {})) if services is gpu else {}
                environment.update(service.get("environment", {}))
                yield f"{where} {name}", program, {k: _compose_default(v) for k, v in environment.items()}


def _dockerfile_environment(path: Path) -> dict[str, str]:
    """The `ENV NAME=value \\` lines of a Dockerfile."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    return {name: value for line in re.findall(r"^ENV (.*)$", text, re.MULTILINE)
            for name, value in re.findall(r"(\w+)=(\S+)", line)}


def _kubernetes_environment() -> dict[str, str]:
    """What the API and worker pods get through `envFrom`: the ConfigMap's data and the Secret's stringData."""
    config = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text(encoding="utf-8"))["data"]
    secret = yaml.safe_load((ROOT / "deploy/k8s/secret.yaml").read_text(encoding="utf-8"))["stringData"]
    return {**config, **secret}


def _unit_environment() -> dict[str, str]:
    text = (ROOT / "deploy/sender/aeic-sender.service").read_text(encoding="utf-8")
    return dict(re.findall(r"^Environment=(\w+)=(\S+)$", text, re.MULTILINE))


def _environments() -> Iterator[tuple[str, str, dict[str, str]]]:
    yield from _compose_environments()
    yield "deploy/k8s/configmap.yaml + secret.yaml", "receiver", _kubernetes_environment()
    yield "deploy/docker/receiver.Dockerfile", "receiver", _dockerfile_environment(
        ROOT / "deploy/docker/receiver.Dockerfile")
    yield "deploy/docker/sender.Dockerfile", "sender", _dockerfile_environment(ROOT / "deploy/docker/sender.Dockerfile")
    yield "deploy/sender/aeic-sender.service", "sender", _unit_environment()


def test_the_deployment_files_set_only_variables_their_program_reads() -> None:
    known = {"receiver": RECEIVER_VARS | RECEIVER_EXTRA_VARS, "sender": SENDER_VARS | SENDER_EXTRA_VARS | EDGE_SIM_VARS}
    wrong = []
    seen = 0
    for where, program, environment in _environments():
        seen += 1
        unknown = sorted(name for name in environment if name.startswith("AEIC_") and name not in known[program])
        if unknown:
            wrong.append(f"{where}: {', '.join(unknown)}: not read by the {program}")
    assert seen >= 8, "the deployment files' extraction broke"
    assert "AEIC_TOKEN_FILE" in (ROOT / "deploy/docker/edge-sim.sh").read_text(encoding="utf-8")
    assert not wrong, "\n".join(wrong)


def test_the_deployment_files_values_are_valid_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each receiver environment loads as its settings (a value out of range or of the wrong type would
    stop the container at start-up); each sender's, with the sample config file where the unit names it."""
    for where, program, environment in _environments():
        with monkeypatch.context() as patch:
            _clear_aeic_environment(patch)
            if program == "receiver":
                for name, value in environment.items():
                    patch.setenv(name, value)
                loaded_settings = load_settings(data_dir=tmp_path)
                for name, value in environment.items():
                    if name in RECEIVER_VARS and name != "AEIC_DATA_DIR":  # the data folder is the test's
                        setting = getattr(loaded_settings, name[len("AEIC_"):].lower())
                        shown = setting.get_secret_value() if isinstance(setting, SecretStr) else setting
                        expected = value.lower() in ("1", "true", "yes", "on") if isinstance(shown, bool) else \
                            type(shown)(value)
                        assert shown == expected, f"{where}: {name}"
            else:
                config = SENDER_TOML if environment.get(SENDER_CONFIG_ENV) == "/etc/aeic/sender.toml" else None
                loaded = load_config({}, config, {k: v for k, v in environment.items() if k != SENDER_CONFIG_ENV})
                for name, value in environment.items():  # the environment beats the file, as documented
                    if name in SENDER_VARS:
                        assert str(getattr(loaded, name[len(ENV_PREFIX):].lower())) == value, f"{where}: {name}"


# -- variables the documents name ----------------------------------------------------------------------


def _code_reads(name: str) -> bool:
    """Whether a source file other than the documents names `name` (a program or a test reads it)."""
    for folder in ("aeic", "benchmarks", "codec", "deploy", "evaluation", "receiver", "sender", "shared",
                   "tests", "training", ".ci"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh", ".toml", ".yaml", ".yml", ".service", ".Dockerfile") and \
                    path.name != Path(__file__).name and name in path.read_text(encoding="utf-8", errors="replace"):
                return True
    return False


def test_every_variable_the_documents_name_is_read() -> None:
    """A setting's variable, the examples of a misspelt one (the code must refuse or name it, as the
    docs say), or a variable some code reads."""
    typos = {"AEIC_MAX_UPLOAD_BYTE": closest_setting("max_upload_byte") == "max_upload_bytes",
             "AEIC_RECIEVER_URL": bool(misspelt_variables({"AEIC_RECIEVER_URL": "x"}))}
    assert all(typos.values()), typos
    named: dict[str, str] = {}
    for doc in DOCS:
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"\bAEIC_[A-Z0-9_]*[A-Z0-9]\b", line):
                named.setdefault(name, f"{doc.relative_to(ROOT)}:{number}")
    assert len(named) > 15, "the variables' extraction broke"
    settings = RECEIVER_VARS | RECEIVER_EXTRA_VARS | SENDER_VARS | SENDER_EXTRA_VARS | set(typos)
    wrong = [f"{where}: {name}" for name, where in sorted(named.items()) if name not in settings and not _code_reads(name)]
    assert not wrong, "variables no code reads:\n" + "\n".join(wrong)


def test_the_values_the_documents_give_receiver_variables_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`AEIC_QUEUE=redis://...` in an example: a value an operator copies is one the receiver takes
    (placeholders such as `...` and `<the token>` aside)."""
    examples = []
    for doc in DOCS:
        for name, value in re.findall(r"\b(AEIC_[A-Z0-9_]+)=('[^']*'|[^\s`'<]+)", doc.read_text(encoding="utf-8")):
            if name in RECEIVER_VARS and "..." not in value:
                examples.append((f"{doc.relative_to(ROOT)}: {name}={value}", name, value.strip("'")))
    assert len(examples) >= 5, "the examples' extraction broke"
    wrong = []
    for where, name, value in examples:
        with monkeypatch.context() as patch:
            _clear_aeic_environment(patch)
            patch.setenv(name, value)
            try:
                load_settings(data_dir=tmp_path)
            except ValueError as exc:  # pydantic's ValidationError and ConfigError are ValueErrors
                wrong.append(f"{where}: {str(exc).splitlines()[0]}")
    assert not wrong, "\n".join(wrong)


def test_every_variable_a_program_reads_is_documented() -> None:
    """A variable the code reads by name (`os.environ.get("AEIC_X")`, `${AEIC_X}` in a script) is named in
    a document, or an operator cannot know it is there. The settings' own variables are the tables'."""
    documented = "\n".join(doc.read_text(encoding="utf-8") for doc in DOCS)
    read: dict[str, str] = {}
    for folder in ("aeic", "benchmarks", "codec", "deploy", "evaluation", "receiver", "sender", "shared", "training"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh"):
                text = path.read_text(encoding="utf-8", errors="replace")
                for name in re.findall(r"[\"'](AEIC_[A-Z0-9_]+)[\"']|\$\{?(AEIC_[A-Z0-9_]+)", text):
                    read.setdefault(name[0] or name[1], str(path.relative_to(ROOT)))
    assert {"AEIC_MODEL", "AEIC_SENDER_CONFIG", "AEIC_TOKEN_FILE"} <= set(read), "the extraction broke"
    wrong = [f"{where}: {name}" for name, where in sorted(read.items())
             if name not in RECEIVER_VARS | SENDER_VARS and not re.search(rf"\b{name}\b", documented)]
    assert not wrong, "variables read but not documented:\n" + "\n".join(wrong)
