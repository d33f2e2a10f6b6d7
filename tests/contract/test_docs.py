"""Docs that cannot drift: README's configuration table is the settings object's own description; every ``grym`` and
``grym-synth`` command shown in README.md, docs/, deploy/README.md and the model configs' comments parses with the
real parsers (every flag and choice exists); every script they name exists; and the Dockerfiles carry every runtime
file the package and the Triton models need. Running the commands against a server: tests/integration/test_cli.py,
tests/integration/test_cli_docs.py."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "deploy" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIG_COMMENTS = sorted((ROOT / "model_repository").rglob("*.pbtxt"))
PROGRAMS = ("grym", "grym-synth")
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "<", ">", ">>", "<(", "$("}
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`((?:grym|grym-synth) [^`]+)`")
PLACEHOLDER = re.compile(r"<[A-Za-z][\w.-]*>")


def test_readme_configuration_table_matches_settings() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- commands in the docs ---------------------------------------------------------------------------------------------
def _snippets(path: Path) -> Iterator[str]:
    """Shell lines of a document: fenced code blocks (continuations joined), inline code that starts with a
    command, and for model configs their ``#`` comments."""
    text = path.read_text()
    if path.suffix == ".pbtxt":
        comments = [line.lstrip()[1:] for line in text.splitlines() if line.lstrip().startswith("#")]
        yield from (c for c in comments if re.search(r"\bgrym(-synth)? ", c))
        return
    for block in FENCE.findall(text):
        yield from block.replace("\\\n", " ").splitlines()
    yield from INLINE.findall(text)


def commands_in(path: Path) -> list[list[str]]:
    """Every ``grym``/``grym-synth`` invocation in ``path`` as argv (program first), up to the next shell operator.
    ``<placeholders>`` become a word; comments and redirections are dropped."""
    return [argv for line in _snippets(path) for argv in commands_in_line(line)]


def commands_in_line(line: str) -> list[list[str]]:
    """The ``grym``/``grym-synth`` invocations of one shell line."""
    found = []
    line = PLACEHOLDER.sub("PLACEHOLDER", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # an unbalanced quote: prose, not a command
        return []
    for i, token in enumerate(tokens):
        if token in PROGRAMS and (i == 0 or tokens[i - 1] in SEPARATORS or "=" in tokens[i - 1]):
            argv = [token]
            for word in tokens[i + 1:]:
                if word in SEPARATORS or set(word) <= set(";&|()<>"):
                    break
                argv.append(word)
            found.append(argv)
    return found


def _parse(argv: list[str]) -> tuple[int, str]:
    """Parse with the real parser of the program; (exit code, stderr). --help/--version exit 0."""
    if argv[0] == "grym":
        from grym.cli import build_parser as parser
    else:
        from grym_synth.cli import _parser as parser
    err = io.StringIO()
    known = _option_strings(parser())
    unknown = [w.split("=")[0] for w in argv[1:] if w.startswith("--") and w.split("=")[0] not in known]
    if unknown:  # argparse would accept an unambiguous prefix (--weights for --weights-dir): not in the docs
        return 2, f"not an option (only a prefix of one?): {unknown}"
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser().parse_args(argv[1:])
        except SystemExit as exc:
            return int(exc.code or 0), err.getvalue()
    return 0, ""


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its sub-commands, recursively."""
    out: set[str] = set()
    for action in parser._actions:
        out.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out |= _option_strings(sub)
    return out


ALL_COMMANDS = [(path, argv) for path in [*DOCS, *CONFIG_COMMENTS] for argv in commands_in(path)]


def test_the_docs_show_commands() -> None:
    """The extraction itself works: README and docs/cli.md show many commands of both programs."""
    programs = {argv[0] for _, argv in ALL_COMMANDS}
    assert programs == set(PROGRAMS)
    assert len([1 for path, _ in ALL_COMMANDS if path.name == "cli.md"]) >= 20
    assert commands_in(ROOT / "README.md")[0][:3] == ["grym", "--target", "localhost:50051"]


@pytest.mark.parametrize("path, argv", ALL_COMMANDS,
                         ids=[f"{p.relative_to(ROOT)}:{' '.join(a)[:60]}" for p, a in ALL_COMMANDS])
def test_documented_command_parses(path: Path, argv: list[str]) -> None:
    code, err = _parse(argv)
    assert code == 0, f"{path.relative_to(ROOT)}: `{shlex.join(argv)}` does not parse: {err.strip()}"


def test_a_wrong_flag_would_be_caught() -> None:
    """The check has teeth: the README's old AudioLDM flag for a model that has none, and a made-up grym flag."""
    assert _parse(["grym-synth", "export", "--weights", "/models/x"])[0] == 2
    assert _parse(["grym", "analyze", "x.wav", "--embedding-head"])[0] == 2
    assert commands_in(ROOT / "docs" / "cli.md")  # and the cli.md commands were all checked above


def test_named_scripts_exist() -> None:
    """Every ``scripts/...`` path the docs and config comments cite is in the repository."""
    missing = []
    for path in [*DOCS, *CONFIG_COMMENTS]:
        for ref in re.findall(r"(?<![\w/])scripts/[\w./-]*\w", path.read_text()):
            if not (ROOT / ref).exists():
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, missing


# --- Dockerfiles ------------------------------------------------------------------------------------------------------
def _copied(dockerfile: Path) -> set[str]:
    copied = set()
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            copied.update(s.rstrip("/").removeprefix("./") for s in sources)
    return copied


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_orchestrator_image_has_every_runtime_file() -> None:
    """The image installs the wheel from what it COPYs: every tracked file under the package folders must be
    copied, and every non-Python file the package reads at run time must be package data (else the wheel, and the
    image, lack it: the plan schema once did)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = _copied(ROOT / "deploy" / "docker" / "orchestrator.Dockerfile")
    package_dirs = project["tool"]["setuptools"]["package-dir"]
    for folder in {d.rstrip("/") for d in package_dirs.values() if d}:
        for file in _tracked(folder):
            assert any(file == c or file.startswith(c + "/") for c in copied), f"not copied: {file}"
    data = project["tool"]["setuptools"]["package-data"]
    for package, folder in (("grym_synth", "server/grym_synth"),
                            ("grym_synth.model_repository", "model_repository")):
        for file in _tracked(folder):
            rel = Path(file).relative_to(folder)
            if file.endswith(".py") and package == "grym_synth":
                continue  # modules: collected by setuptools
            if rel.name == "README.md" or rel.name.startswith("."):
                continue
            owner = ".".join([package, *rel.parts[:-1]]) if package == "grym_synth" else package
            patterns = data.get(owner, []) if package == "grym_synth" else data[package]
            tail = rel.name if package == "grym_synth" else str(rel)
            assert any(Path(tail).match(p) or Path(tail).match(p.removeprefix("**/")) for p in patterns), \
                f"{file} is not package data of {owner}: the installed package (and the image) would lack it"


TRITON_BUILTIN_BACKENDS = {"python", "onnxruntime", "tensorrt", "vllm", "pytorch", "tensorflow", "openvino"}
# import name -> what the triton image's pip line must install
DISTRIBUTIONS = {"torch": "torch", "transformers": "transformers", "diffusers": "diffusers", "tokenizers": "tokenizers",
                 "onnxruntime": "onnxruntime", "numpy": "numpy", "llguidance": "llguidance"}


def test_triton_image_has_every_backend_and_its_imports() -> None:
    """Every model config's backend is a Triton one or ours under model_repository/backends/ (which the image
    COPYs), and every third-party module our backends and model files import is pip-installed in the image."""
    dockerfile = (ROOT / "deploy" / "docker" / "triton.Dockerfile").read_text()
    assert "model_repository/backends" in _copied(ROOT / "deploy" / "docker" / "triton.Dockerfile")
    for config in (ROOT / "model_repository").rglob("*.pbtxt"):
        for backend in re.findall(r'^backend:\s*"([^"]+)"', config.read_text(), re.M):
            assert backend in TRITON_BUILTIN_BACKENDS or (ROOT / "model_repository" / "backends" / backend /
                                                          "model.py").exists(), f"{config}: backend {backend}"
    local = {p.stem for p in (ROOT / "model_repository").rglob("*.py")} | {"triton_python_backend_utils"}
    imported: set[str] = set()
    for source in (ROOT / "model_repository").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - local - {"grym_synth"}
    pip_line = " ".join(line for line in dockerfile.splitlines() if "pip install" in line or line.startswith("  "))
    unknown = third_party - set(DISTRIBUTIONS)
    assert not unknown, f"model code imports {sorted(unknown)}: add them to the Triton image and to DISTRIBUTIONS"
    for module in third_party:
        assert f'"{DISTRIBUTIONS[module]}' in pip_line, f"triton.Dockerfile does not install {DISTRIBUTIONS[module]}"
