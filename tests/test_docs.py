"""The documentation against the code it describes: links and anchors resolve, every command line shown for
`aeic`, `aeic-send`, `aeic-receiver`, `aeic-train` and `python -m <module>` names a subcommand and flags its
parser has, the repository paths named in code spans exist, and the README's benchmark block is what the
committed results render to.

Why: the docs are how a user meets these commands; a renamed flag or a moved heading went unnoticed until a
reader hit it. Parsers are read, never run: `parse_args` is replaced to hand back the parser it was called on.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.table import END, START, render

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "deploy").rglob("*.md"))]
PROGRAMS = ("aeic", "aeic-send", "aeic-receiver", "aeic-train")
# Folders a command writes (examples name them as outputs), not part of a checkout.
OUTPUT_ROOTS = {"runs", "build", "demo-out"}


class _Parsed(Exception):
    """Raised by the stand-in `parse_args`: carries the parser a `main` built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def _parser_of(main: Callable[..., object], monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser `main` builds, taken at its `parse_args` call, before the command does anything."""

    def stand_in(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> argparse.Namespace:
        raise _Parsed(self)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", stand_in)
        patch.setattr(sys, "argv", ["prog"])
        try:
            main() if main.__code__.co_argcount == 0 else main([])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{main.__module__}.main did not parse its arguments")


def _code(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, line, inline) of every line in a code block and of every inline code span."""
    in_block = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block:
            yield number, line, False
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield number, span, True


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@pytest.fixture(scope="module")
def parsers() -> Iterator[dict[str, argparse.ArgumentParser]]:
    """The four entry points' parsers, by program name; `aeic eval` parses its own arguments."""
    from aeic.codec import cli as codec_cli
    from aeic.evaluation import cli as eval_cli
    from aeic.receiver import cli as receiver_cli
    from aeic.sender import cli as sender_cli
    from aeic.training import cli as training_cli

    with pytest.MonkeyPatch.context() as patch:
        yield {"aeic": codec_cli.build_parser(), "aeic eval": eval_cli.build_parser(),
               "aeic-send": sender_cli.build_parser(), "aeic-receiver": receiver_cli._parser(),
               "aeic-train": _parser_of(training_cli.main, patch)}


def _resolve(program: str, words: list[str], parsers: dict[str, argparse.ArgumentParser]) -> tuple[
        argparse.ArgumentParser, set[str], list[str], str | None]:
    """(the subcommand's parser, the options of its parents, the words after it, a wrong subcommand's name)."""
    if program == "aeic" and words[:1] == ["eval"]:
        return parsers["aeic eval"], set(), words[1:], None
    parser, inherited = parsers[program], set()
    while choices := _subcommands(parser):
        inherited |= _options(parser)
        if words and words[0] in choices:
            parser, words = choices[words[0]], words[1:]
        elif program == "aeic-send":  # `aeic-send IMAGE...` is `aeic-send send IMAGE...`
            parser = choices["send"]
        else:
            wrong = words[0] if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else None
            return parser, inherited, words, wrong
    return parser, inherited, words, None


def _flags(words: list[str]) -> list[str]:
    return [word.split("=")[0] for word in words if re.fullmatch(r"--[a-z][a-z0-9-]*(=\S*)?", word)]


def _program_lines() -> Iterator[tuple[str, str, list[str]]]:
    """(where, program, words after it) of every command line of the four programs in the docs."""
    names = "|".join(re.escape(program) for program in sorted(PROGRAMS, key=len, reverse=True))
    pattern = re.compile(r"(?:^|(?<=[\s(]))(" + names + r")(?=\s|$)")
    for doc in DOCS:
        for number, line, _ in _code(doc.read_text(encoding="utf-8")):
            command = line.split(" #")[0]
            for match in pattern.finditer(command):
                words = re.split(r"[|;&]", command[match.end():])[0].split()
                if words[:1] and words[0] in PROGRAMS:  # `sudo -u aeic aeic-send ...`: the user, then the program
                    continue
                yield f"{doc.relative_to(ROOT)}:{number}", match.group(1), words


def test_every_documented_command_line_uses_flags_its_parser_has(
        parsers: dict[str, argparse.ArgumentParser]) -> None:
    wrong = []
    checked = 0
    for where, program, words in _program_lines():
        parser, inherited, rest, bad_command = _resolve(program, words, parsers)
        checked += 1
        if bad_command:
            wrong.append(f"{where}: `{program} {bad_command}`: no such subcommand")
        unknown = [flag for flag in _flags(rest) if flag not in _options(parser) | inherited]
        if unknown:
            wrong.append(f"{where}: `{program} {' '.join(words)}`: {parser.prog} has no {', '.join(unknown)}")
    assert checked > 50, f"only {checked} command lines found: the extraction broke"
    assert not wrong, "\n".join(wrong)


def _module_commands() -> Iterator[tuple[str, str, list[str]]]:
    """(where, module, words after it) of every `python -m` line of this project's modules, and of the
    benchmark table's rows (`| \\`x_bench\\` | ... | flags |`), whose last cell lists the module's flags."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for number, line, _ in _code(text):
            for match in re.finditer(r"python3? -m ((?:aeic|benchmarks)\.[\w.]+)((?:[ \t]+[^\s|;&`]+)*)", line):
                yield f"{doc.relative_to(ROOT)}:{number}", match.group(1), match.group(2).split()
        for number, line in enumerate(text.splitlines(), 1):
            row = re.match(r"\| `(\w+_bench)`[^|]*\|.*\|([^|]*)\|\s*$", line)
            if row:
                words = [w for span in re.findall(r"`([^`]+)`", row.group(2)) for w in re.split(r"[\s/]+", span)]
                yield f"{doc.relative_to(ROOT)}:{number}", f"benchmarks.{row.group(1)}", words


def test_every_documented_python_module_command_exists_with_its_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = []
    commands = list(_module_commands())
    assert len(commands) > 10, "the `python -m` extraction broke"
    options: dict[str, set[str]] = {}
    for where, module, words in commands:
        if module not in options:
            try:
                main = importlib.import_module(module).main
            except (ImportError, AttributeError) as exc:
                wrong.append(f"{where}: `python -m {module}`: {exc}")
                continue
            options[module] = _options(_parser_of(main, monkeypatch))
        unknown = [flag for flag in _flags(words) if flag not in options[module]]
        if unknown:
            wrong.append(f"{where}: `python -m {module}` has no {', '.join(unknown)}")
    assert not wrong, "\n".join(wrong)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_block = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_block = not in_block
        heading = None if in_block else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = _slug(heading.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_slug_follows_github() -> None:
    assert _slug("Byte budgets (`encode_to_budget`)") == "byte-budgets-encode_to_budget"
    assert _slug("API (`/v1`, OpenAPI at `/openapi.json`)") == "api-v1-openapi-at-openapijson"


def test_every_relative_link_and_anchor_resolves() -> None:
    wrong = []
    links = 0
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z][a-z+.-]*:", target):
                continue
            links += 1
            path, _, anchor = target.partition("#")
            resolved = (doc.parent / path).resolve() if path else doc
            if not resolved.exists():
                wrong.append(f"{doc.relative_to(ROOT)}: ({target}): no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                wrong.append(f"{doc.relative_to(ROOT)}: ({target}): no heading with that anchor")
    assert links > 20, "the link extraction broke"
    assert not wrong, "\n".join(wrong)


def test_every_repository_path_in_a_code_span_exists() -> None:
    """`sender/coding_scale.py`, `benchmarks/results/x.json`...: a span that starts with a top-level folder of
    the repository names a file or folder that is there (placeholders and command outputs aside)."""
    top = {path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith(".")} - OUTPUT_ROOTS
    wrong = []
    for doc in DOCS:
        for number, span, inline in _code(doc.read_text(encoding="utf-8")):
            if not inline:
                continue
            for path in re.findall(r"(?<![\w./~-])([a-z_]+/[\w./-]*[\w])(?![\w/<*{])", span):
                if path.split("/")[0] in top and not (ROOT / path).exists():
                    wrong.append(f"{doc.relative_to(ROOT)}:{number}: `{span}`: no {path}")
    assert not wrong, "\n".join(wrong)


def test_readme_benchmark_block_is_what_the_results_render_to() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split(START, 1)[1].split(END, 1)[0]
    assert block.strip() == render(ROOT / "benchmarks" / "results").strip(), (
        "README.md's benchmark table differs from benchmarks/results/*.json: run "
        "`python -m benchmarks.run_all --table-only`")


def test_the_architecture_picture_names_real_files_and_the_codes_numbers() -> None:
    """docs/architecture.md's picture is a code block, which the path check above does not read: its
    files exist, and its figures (strip rows, halos, padding, header sizes) are the code's and the
    shipped package's."""
    from aeic.sender.tiled_analysis import (
        DEFAULT_STEM_CELLS,
        DEFAULT_STRIP_ROWS,
        DEFAULT_TRUNK_CELLS,
        trunk_tiling,
    )
    from aeic.shared import bitstream
    from aeic.shared.model_package import SENDER_FILES, ModelPackage
    from aeic.shared.padding import ALIGNMENT

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    picture = text.split("```", 2)[1]
    paths = re.findall(r"\b((?:sender|receiver|shared|codec)/[\w/]*\w(?:\.py)?)\b", picture)
    assert len(paths) > 15, "the path extraction broke"
    assert [path for path in paths if not (ROOT / path).exists()] == []
    package = ModelPackage.load(None, needs=SENDER_FILES)
    factor, halo = package.analysis_tiling
    _, trunk_halo = trunk_tiling(package.manifest["config"]["analysis"], factor)
    header = bitstream.HEADER_SIZE
    for figure in (f"{DEFAULT_STRIP_ROWS}-row strips", f"tiles of <= {DEFAULT_STEM_CELLS // 1024} Ki px, {halo}-px halos",
                   f"row strips of <= {DEFAULT_TRUNK_CELLS // 1024} Ki cells", f"{trunk_halo}-px halos",
                   f"pad to {ALIGNMENT}", f"{header}/{header + bitstream.COLOUR_STATS_SIZE} B header + CRC32",
                   f"container v{bitstream.FORMAT_VERSION}"):
        assert figure in picture, f"docs/architecture.md's picture lacks {figure!r}"
