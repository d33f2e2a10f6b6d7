"""The API contract: proto/ must pass buf's lint (STANDARD + COMMENTS) and stay wire- and source-compatible.

WHY: proto/ is the only definition of the public API. Python, C++ and Node clients are generated from it, so a
renamed field or a deleted RPC silently breaks every released client. ``buf breaking`` (FILE category) compares
the working tree with the API as committed on main; ``buf lint`` keeps names and documentation consistent.

buf comes from npm (scripts/install_tools.sh puts it in build/tools/node); without it the buf tests skip locally
and fail under CI=true, where the install script has run. The documentation test does not need buf: it reads
the comments from protoc's descriptors itself, so it reports exactly which element lacks one.

GRYM_BUF_BREAKING_AGAINST overrides the baseline with any buf input, e.g. ``.git#tag=v0.1.0,subdir=proto``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
BUF_LOCAL = ROOT / "build" / "tools" / "node" / "node_modules" / ".bin" / "buf"
BASELINE_BRANCH = "main"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _missing_tool(reason: str) -> None:
    """Skip on a developer machine without the tool; in CI the install script must have provided it."""
    message = f"{reason}: run scripts/install_tools.sh"
    if IN_CI:
        pytest.fail(f"CI=true but {message}")
    pytest.skip(message)


@pytest.fixture(scope="session")
def buf() -> str:
    """Path of the buf binary (the pinned npm copy first, then one on PATH)."""
    if BUF_LOCAL.exists():
        return str(BUF_LOCAL)
    on_path = shutil.which("buf")
    if on_path:
        return on_path
    _missing_tool("buf is not installed")
    raise AssertionError("unreachable")


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return _run(["git", *args], cwd=cwd, timeout=30)


# --- buf configuration and lint -----------------------------------------------------------------------------


def test_buf_yaml_declares_the_agreed_policy() -> None:
    """buf.yaml is v2 with the proto/ module, STANDARD + COMMENTS lint and FILE breaking rules."""
    config = yaml.safe_load((ROOT / "buf.yaml").read_text())
    assert config["version"] == "v2"
    assert [m["path"] for m in config["modules"]] == ["proto"]
    assert {"STANDARD", "COMMENTS"} <= set(config["lint"]["use"])
    assert config["breaking"]["use"] == ["FILE"]


def test_buf_enforces_comment_rules(buf: str) -> None:
    """The configured rule set really contains buf's COMMENT_* rules (not only declared in YAML)."""
    result = _run([buf, "config", "ls-lint-rules", "--configured-only", "--format", "json"])
    assert result.returncode == 0, result.stderr
    ids = {json.loads(line)["id"] for line in result.stdout.splitlines() if line.strip()}
    expected = {"COMMENT_SERVICE", "COMMENT_RPC", "COMMENT_MESSAGE", "COMMENT_FIELD", "COMMENT_ENUM",
                "COMMENT_ENUM_VALUE", "COMMENT_ONEOF"}
    assert expected <= ids, f"missing lint rules: {sorted(expected - ids)}"


def test_buf_lint_is_clean(buf: str) -> None:
    """`buf lint` reports nothing on the committed API."""
    result = _run([buf, "lint", "--error-format", "text"])
    assert result.returncode == 0, f"buf lint findings:\n{result.stdout}{result.stderr}"


def test_buf_lint_rejects_an_undocumented_message(buf: str, tmp_path: Path) -> None:
    """Negative control: the same configuration fails a copy of the API whose message lost its comment."""
    shutil.copytree(PROTO_DIR, tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    target = tmp_path / "proto" / "grym" / "v1" / "orchestrator.proto"
    target.write_text(target.read_text() + "\nmessage GrymUndocumentedProbe {\n  // A field.\n  string x = 1;\n}\n")
    result = _run([buf, "lint", "--error-format", "text"], cwd=tmp_path)
    assert result.returncode != 0
    assert 'Message "GrymUndocumentedProbe" should have a non-empty comment' in result.stdout, result.stdout


# --- every element documented (independent of buf) ----------------------------------------------------------


def _descriptor_set(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    """proto/ compiled by grpc_tools' protoc with source info, i.e. with each element's comments."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / "api.binpb"
    files = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{well_known}", "--include_source_info",
                        f"--descriptor_set_out={out}", *files])
    assert code == 0, "protoc failed to compile proto/"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


# FileDescriptorProto / DescriptorProto field numbers used in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM, _MSG_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2


def _undocumented(fd: descriptor_pb2.FileDescriptorProto) -> list[str]:
    """Names of the services, RPCs, messages, fields, oneofs, enums and values of one file without a comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}
    missing: list[str] = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(f"{fd.name}: {name}")

    def enum(path: tuple[int, ...], e: descriptor_pb2.EnumDescriptorProto, prefix: str) -> None:
        check(path, f"enum {prefix}{e.name}")
        for i, v in enumerate(e.value):
            check(path + (_ENUM_VALUE, i), f"enum value {prefix}{e.name}.{v.name}")

    def message(path: tuple[int, ...], m: descriptor_pb2.DescriptorProto, prefix: str) -> None:
        if m.options.map_entry:  # synthesized for map<,> fields: documented by the field itself
            return
        full = f"{prefix}{m.name}"
        check(path, f"message {full}")
        for i, f in enumerate(m.field):
            check(path + (_MSG_FIELD, i), f"field {full}.{f.name}")
        for i, o in enumerate(m.oneof_decl):
            if not any(f.HasField("oneof_index") and f.oneof_index == i and f.proto3_optional for f in m.field):
                check(path + (_MSG_ONEOF, i), f"oneof {full}.{o.name}")
        for i, n in enumerate(m.nested_type):
            message(path + (_MSG_NESTED, i), n, full + ".")
        for i, e in enumerate(m.enum_type):
            enum(path + (_MSG_ENUM, i), e, full + ".")

    for i, m in enumerate(fd.message_type):
        message((_FILE_MESSAGE, i), m, "")
    for i, e in enumerate(fd.enum_type):
        enum((_FILE_ENUM, i), e, "")
    for i, s in enumerate(fd.service):
        check((_FILE_SERVICE, i), f"service {s.name}")
        for j, rpc in enumerate(s.method):
            check((_FILE_SERVICE, i, _SERVICE_METHOD, j), f"rpc {s.name}.{rpc.name}")
    return missing


def test_every_rpc_message_field_and_enum_has_a_leading_comment(tmp_path: Path) -> None:
    """The proto files are the API reference: nothing public may be undocumented."""
    fds = _descriptor_set(tmp_path)
    ours = [fd for fd in fds.file if fd.package.startswith("grym.")]
    assert ours, "no grym.* proto files compiled"
    assert any(fd.service for fd in ours), "the API defines no service"
    missing = [name for fd in ours for name in _undocumented(fd)]
    assert not missing, "elements without a leading comment:\n" + "\n".join(missing)


def test_comment_check_detects_a_missing_comment(tmp_path: Path) -> None:
    """Negative control for the walker above: a message without a comment is reported."""
    fd = descriptor_pb2.FileDescriptorProto(name="probe.proto", package="grym.probe")
    fd.message_type.add(name="Probe").field.add(name="x", number=1, type=9)
    loc = fd.source_code_info.location.add(path=[_FILE_MESSAGE, 0, _MSG_FIELD, 0])
    loc.leading_comments = " A field.\n"
    assert _undocumented(fd) == ["probe.proto: message Probe"]


# --- breaking changes against main --------------------------------------------------------------------------


def _baseline() -> str:
    """The buf input to compare against: main's committed proto/, or a skip that says why there is none."""
    override = os.environ.get("GRYM_BUF_BREAKING_AGAINST")
    if override:
        return override
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        pytest.skip("not a git checkout: no committed API to compare against")
    sha = None
    for ref in (BASELINE_BRANCH, f"origin/{BASELINE_BRANCH}"):
        result = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
        if result.returncode == 0:
            sha = result.stdout.strip()
            break
    if sha is None:
        shallow = _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        why = "the checkout is shallow and has no" if shallow else "no commit on"
        pytest.skip(f"{why} branch {BASELINE_BRANCH!r} yet: nothing to check breaking changes against")
    if _git("cat-file", "-e", f"{sha}:proto").returncode != 0:
        pytest.skip(f"branch {BASELINE_BRANCH!r} ({sha[:12]}) has no committed proto/ yet")
    # A commit id rather than the branch name: the same baseline whether main is a local or a remote branch.
    return f".git#ref={sha},subdir=proto"


def test_no_breaking_changes_against_main(buf: str) -> None:
    """The working tree's API keeps every message, field number, name and RPC of main's (FILE rules)."""
    against = _baseline()
    result = _run([buf, "breaking", "--against", against, "--error-format", "text"], timeout=300)
    assert result.returncode == 0, f"breaking changes against {against}:\n{result.stdout}{result.stderr}"


def test_buf_breaking_detects_a_deleted_field(buf: str, tmp_path: Path) -> None:
    """Negative control with the same .git input syntax: deleting a field of a committed API is reported."""
    shutil.copytree(PROTO_DIR, tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    identity = ["-c", "user.email=ci@grym.invalid", "-c", "user.name=ci"]
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], [*identity, "commit", "-q", "-m", "baseline"]):
        result = _git(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    common = tmp_path / "proto" / "grym" / "v1" / "common.proto"
    text = common.read_text()
    assert "int32 channels = 3;" in text, "probe field moved: update this control"
    common.write_text(text.replace("int32 channels = 3;", "reserved 3;"))
    sha = _git("rev-parse", "HEAD", cwd=tmp_path).stdout.strip()
    result = _run([buf, "breaking", "--against", f".git#ref={sha},subdir=proto", "--error-format", "text"],
                  cwd=tmp_path)
    assert result.returncode != 0
    assert 'field "3" with name "channels" on message "PcmAudio" was deleted' in result.stdout, result.stdout
