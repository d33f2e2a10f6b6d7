"""Acceptance tests of the ``grym`` CLI as a user runs it: the installed console script as a subprocess against the
real orchestrator (session fixtures: Triton on the tiny repository, milvus-lite), every command in ``--json`` mode,
bearer token and TLS/mTLS, and the error lines and exit codes of docs/cli.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from grym import Client
from support import OrchestratorProcess, tone, wav_bytes

from conftest import orchestrator_args

EXIT_OK, EXIT_SERVER, EXIT_USAGE = 0, 1, 2


def grym_command() -> list[str]:
    """The installed ``grym`` console script of this interpreter's environment (what ``pip install`` put on the
    PATH), falling back to the one on PATH, then to ``python -m grym``."""
    script = Path(sys.executable).parent / "grym"
    if script.exists():
        return [str(script)]
    found = shutil.which("grym")
    return [found] if found else [sys.executable, "-m", "grym"]


def run(target: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GRYM_")}
    environ.update(env or {})
    result = subprocess.run([*grym_command(), "--target", target, *args], input=stdin, capture_output=True,
                            env=environ, timeout=timeout)
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout.decode(),
                                       result.stderr.decode())


def ok_json(result: subprocess.CompletedProcess[str]) -> dict:
    assert result.returncode == EXIT_OK, result.stderr
    assert "Traceback" not in result.stderr and "\r" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def one_error_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The documented error shape: the exit code, exactly one line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def song(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli_audio") / "song.wav"
    path.write_bytes(wav_bytes(tone(2.0, 16_000, 330.0, seed=3), 16_000))
    return path


@pytest.fixture(scope="module")
def target(orchestrator: OrchestratorProcess) -> str:
    return orchestrator.target


def test_health_json_and_unknown_service(target: str) -> None:
    assert ok_json(run(target, "health", "--json")) == {"service": "", "status": "SERVING"}
    line = one_error_line(run(target, "health", "--service", "bogus"), EXIT_SERVER, "NOT_FOUND", "'bogus'")
    assert "triton" in line and "milvus" in line  # says which names exist


def test_analyze_json_has_everything_the_server_returned(target: str, song: Path, client: Client) -> None:
    doc = ok_json(run(target, "analyze", str(song), "--json", "--features", "--store", "--tag", "test=cli"))
    reference = client.analyze(str(song))  # the library's own call of the same RPC
    assert len(doc["embedding"]) == len(reference.embedding) > 4  # the full embedding, not a head
    np.testing.assert_allclose(doc["embedding"], reference.embedding, rtol=1e-5, atol=1e-6)
    assert doc["frames"] == reference.frames and doc["features"]["rows"] == doc["frames"]
    assert len(doc["features"]["values"]) == doc["features"]["rows"] * doc["features"]["cols"]
    assert doc["tags"] == {"test": "cli"} and doc["pattern_id"] and doc["model"] == "wav2vec2"
    assert all(k == k.lower() for k in doc)  # snake_case: the proto's own names
    # the same file from standard input; the global options may also come first
    doc_stdin = json.loads(subprocess.run([*grym_command(), "--json", "--target", target, "analyze", "-"],
                                          input=song.read_bytes(), capture_output=True, timeout=120).stdout)
    np.testing.assert_allclose(doc_stdin["embedding"], doc["embedding"], rtol=1e-5, atol=1e-6)


def test_text_mode_is_a_summary(target: str, song: Path) -> None:
    result = run(target, "analyze", str(song))
    doc = ok_json(result)
    assert doc["embedding_dim"] > 4 and len(doc["embedding_head"]) == 4


def test_input_errors_exit_2_with_one_line(target: str, tmp_path: Path) -> None:
    one_error_line(run(target, "analyze", str(tmp_path / "missing.wav")), EXIT_USAGE, "missing.wav",
                   "No such file")
    one_error_line(run(target, "analyze", "--tag", "novalue", str(tmp_path / "x.wav")), EXIT_USAGE)
    one_error_line(run(target, "generate", "a pad", "--out", str(tmp_path / "x.xyz")), EXIT_USAGE, "x.xyz")
    one_error_line(run(target, "generate", "a pad", "--out", str(tmp_path / "x.wav"), "--format", "mp3"),
                   EXIT_USAGE, "mp3")
    one_error_line(run(target, "analyze"), EXIT_USAGE, "FILE")  # argparse's own error, one line too
    one_error_line(run(target, "health", "--token-file", str(tmp_path / "no-token")), EXIT_USAGE, "no-token")
    (tmp_path / "noise.wav").write_bytes(b"not audio at all" * 10)
    one_error_line(run(target, "stream", str(tmp_path / "noise.wav")), EXIT_USAGE, "cannot decode")


def test_server_errors_exit_1_with_the_code(target: str, tmp_path: Path) -> None:
    unknown = str(uuid.uuid4())
    one_error_line(run(target, "patterns", "get", unknown), EXIT_SERVER, "NOT_FOUND", unknown)
    one_error_line(run(target, "rate", unknown, "4", "--json"), EXIT_SERVER, "NOT_FOUND")
    one_error_line(run(target, "workflows", "wf-does-not-exist"), EXIT_SERVER)
    (tmp_path / "junk.wav").write_bytes(b"RIFF but not really a wave file")
    one_error_line(run(target, "analyze", str(tmp_path / "junk.wav")), EXIT_SERVER, "INVALID_ARGUMENT")
    one_error_line(run("127.0.0.1:1", "health", "--timeout", "2"), EXIT_SERVER)  # nobody listens


def test_pattern_commands_json(target: str, song: Path) -> None:
    stored = ok_json(run(target, "analyze", str(song), "--store", "--tag", "test=cli-patterns", "--json"))
    pid = stored["pattern_id"]
    got = ok_json(run(target, "patterns", "get", pid, "--embedding", "--json"))
    assert got["pattern_id"] == pid and len(got["embedding"]) == len(stored["embedding"])
    listed = ok_json(run(target, "patterns", "list", "--tag", "test=cli-patterns", "--json"))
    assert [p["pattern_id"] for p in listed["patterns"]] == [pid]
    found = ok_json(run(target, "search", "--pattern-id", pid, "--json", "--top-k", "3"))
    assert "matches" in found and found["request_id"]
    like = ok_json(run(target, "search", "--like", str(song), "--tag", "test=cli-patterns", "--json"))
    assert like["matches"][0]["pattern"]["pattern_id"] == pid and like["matches"][0]["score"] > 0.99
    rated = ok_json(run(target, "rate", pid, "5", "--comment", "good", "--json"))
    assert rated == {**rated, "pattern_id": pid, "rating_count": 1, "mean_rating": 5.0}
    clusters = ok_json(run(target, "clusters", "--json"))
    assert isinstance(clusters["clusters"], list)
    deleted = ok_json(run(target, "patterns", "delete", pid, "--json"))
    assert deleted["pattern_id"] == pid
    one_error_line(run(target, "patterns", "get", pid), EXIT_SERVER, "NOT_FOUND")


def test_stream_prints_windows_as_they_arrive(target: str, tmp_path: Path) -> None:
    audio = tone(25.0, 22_050, 220.0, channels=2, seed=5)  # 3 windows of 10 s at the server; stereo 22.05 kHz
    path = tmp_path / "long.flac"
    sf.write(path, audio, 22_050, format="FLAC")  # decoded here, sent as PCM: any format libsndfile reads
    text = run(target, "stream", str(path))
    assert text.returncode == EXIT_OK, text.stderr
    lines = text.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["window 0", "window 1", "window 2", "final"]
    doc = ok_json(run(target, "stream", str(path), "--json"))
    assert len(doc["windows"]) == 3 and doc["final"]["is_final"] and doc["final"]["window_index"] == 3
    assert abs(doc["final"]["end_seconds"] - 25.0) < 0.05 and len(doc["final"]["embedding"]) > 4
    jsonl = run(target, "stream", "-", "--jsonl", stdin=path.read_bytes())
    rows = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert [r["is_final"] for r in rows] == [False, False, False, True]


def test_generate_writes_the_audio_and_reports_everything(target: str, tmp_path: Path) -> None:
    out = tmp_path / "pad.wav"
    result = run(target, "generate", "warm pad", "--seconds", "1", "--steps", "2", "--seed", "7", "--out", str(out),
                 "--json")
    doc = ok_json(result)  # also: no progress bar ("\r") in a pipe
    audio, rate = sf.read(out)
    assert rate == doc["result"]["sample_rate_hz"] == doc["output"]["sample_rate_hz"]
    assert abs(len(audio) / rate - doc["result"]["duration_seconds"]) < 0.01
    assert doc["result"]["seed"] == "7"  # int64 is a string in protobuf's JSON mapping
    assert len(doc["result"]["embedding"]) > 4 and doc["progress_events"] == 2
    assert doc["output"] == {"path": str(out), "format": "WAV_PCM16", "bytes": out.stat().st_size,
                             "sample_rate_hz": rate}


def test_compose_and_workflows(target: str, tmp_path: Path) -> None:
    out = tmp_path / "piece.wav"
    doc = ok_json(run(target, "compose", "a 2 second calm piano piece", "--out", str(out), "--json",
                      "--max-tokens", "16", "--seed", "1", timeout=400))
    summary = doc["summary"]
    assert summary["state"] == "STATE_SUCCEEDED" and doc["plan"]["plan_json"] and doc["steps"]
    if doc["output"]:
        assert sf.info(out).frames > 0
    wf_id = doc["workflow_id"]
    plain = ok_json(run(target, "workflows", wf_id))  # the text mode too is snake_case now
    assert plain["workflow_id"] == wf_id and "workflowId" not in json.dumps(plain) and "plan_json" in plain
    assert ok_json(run(target, "workflows", wf_id, "--json")) == plain
    listed = ok_json(run(target, "workflows", "--json", "--limit", "5"))
    assert wf_id in [w["workflow_id"] for w in listed["workflows"]]
    table = run(target, "workflows")
    assert table.returncode == 0 and wf_id in table.stdout


def test_help_shows_defaults_and_completion_works() -> None:
    help_text = subprocess.run([*grym_command(), "generate", "--help"], capture_output=True, text=True).stdout
    for flag, default in [("--seconds", "0.0"), ("--steps", "0"), ("--scheduler", "ddim"), ("--out", "generated.wav")]:
        assert flag in help_text and f"(default: {default})" in " ".join(help_text.split()), flag
    search_help = subprocess.run([*grym_command(), "search", "--help"], capture_output=True, text=True).stdout
    assert "(default: 5)" in search_help
    list_help = subprocess.run([*grym_command(), "patterns", "list", "--help"], capture_output=True, text=True).stdout
    assert "(default: 50)" in list_help
    if not shutil.which("bash"):
        pytest.skip("no bash")
    script = subprocess.run([*grym_command(), "completion", "bash"], capture_output=True, text=True).stdout

    def complete(*words: str) -> list[str]:
        probe = (f'{script}\nCOMP_WORDS=(grym {" ".join(words)}); COMP_CWORD={len(words)}; _grym_complete; '
                 'printf "%s\\n" "${COMPREPLY[@]}"')
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.split()

    assert complete("ana") == ["analyze"]
    assert "--music-detail" in complete("analyze", "--mu")
    assert set(complete("patterns", "")) >= {"list", "get", "delete", "audio"}
    assert "--init-pattern" in complete("--target", "h:1", "generate", "--init-")
    zsh = subprocess.run([*grym_command(), "completion", "zsh"], capture_output=True, text=True).stdout
    assert zsh.startswith("autoload -U +X bashcompinit")


# --- token and TLS ----------------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server (127.0.0.1/localhost) and a client certificate it signed."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=grym-test-ca", cwd=folder)
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=grym-{name}", cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)
    return {n: folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


@pytest.fixture(scope="module")
def secured(triton, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A private orchestrator with a bearer token (from a file) and mutual TLS."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make the test certificates")
    folder = tmp_path_factory.mktemp("pki")
    pki = make_pki(folder)
    token_file = folder / "token"
    token_file.write_text("s3cret-token-for-the-cli\n")
    token_file.chmod(0o600)
    proc = OrchestratorProcess(tmp_path_factory.mktemp("secured"), orchestrator_args(
        triton, "--auth-token-file", str(token_file), "--tls-cert", str(pki["server.pem"]),
        "--tls-key", str(pki["server.key"]), "--tls-client-ca", str(pki["ca.pem"]))).start()
    yield proc, pki, token_file
    proc.stop()


def test_token_and_mutual_tls(secured, song: Path) -> None:  # type: ignore[no-untyped-def]
    proc, pki, token_file = secured
    tls = ["--tls-ca", str(pki["ca.pem"]), "--tls-cert", str(pki["client.pem"]), "--tls-key", str(pki["client.key"])]
    # everything right: token from a file, or from GRYM_TOKEN
    doc = ok_json(run(proc.target, *tls, "--token-file", str(token_file), "analyze", str(song), "--json"))
    assert len(doc["embedding"]) > 4
    listed = ok_json(run(proc.target, "patterns", "list", "--json", *tls,
                         env={"GRYM_TOKEN": token_file.read_text().strip()}))
    assert listed == {"patterns": []}
    # no token: UNAUTHENTICATED (health stays open for probes)
    one_error_line(run(proc.target, *tls, "patterns", "list"), EXIT_SERVER, "UNAUTHENTICATED")
    assert ok_json(run(proc.target, *tls, "health", "--json"))["status"] == "SERVING"
    one_error_line(run(proc.target, *tls, "patterns", "list", env={"GRYM_TOKEN": "wrong"}), EXIT_SERVER,
                   "UNAUTHENTICATED")
    # no client certificate, no TLS at all, or a CA that did not sign the server: the connection fails
    one_error_line(run(proc.target, "--tls-ca", str(pki["ca.pem"]), "--token-file", str(token_file), "--timeout", "5",
                       "health"), EXIT_SERVER, "UNAVAILABLE")
    one_error_line(run(proc.target, "--timeout", "5", "health"), EXIT_SERVER, "UNAVAILABLE")
    one_error_line(run(proc.target, "--tls", "--timeout", "5", "health"), EXIT_SERVER, "UNAVAILABLE")
    one_error_line(run(proc.target, "--tls-cert", str(pki["client.pem"]), "health"), EXIT_USAGE, "--tls-key")


async def test_async_client_has_the_sync_clients_calls(orchestrator: OrchestratorProcess, song: Path) -> None:
    """The methods the async client lacked before (workflows, clusters, rate, list_patterns), and the rest, against
    the real server."""
    from grym import AsyncClient, GrymError
    from grym.v1 import orchestrator_pb2 as pb

    async with AsyncClient(orchestrator.target, timeout_s=120) as c:
        a = await c.analyze(str(song), store=True, tags={"test": "async-cli"})
        assert (await c.get_pattern(a.pattern_id, include_embedding=True)).embedding
        listed = [p.pattern_id async for p in c.list_patterns(page_size=1, tag_filter={"test": "async-cli"})]
        assert listed == [a.pattern_id]
        assert (await c.rate(a.pattern_id, 4, "fine")).rating_count == 1
        assert isinstance(await c.clusters(), list)
        assert all(m.pattern.pattern_id != a.pattern_id for m in await c.search(pattern_id=a.pattern_id, top_k=3))
        workflows = await c.list_workflows(page_size=5)
        for w in workflows[:1]:
            assert (await c.get_workflow(w.workflow_id)).workflow_id == w.workflow_id
        raw = await c.call("GetPattern", pb.GetPatternRequest(pattern_id=a.pattern_id))
        assert raw.pattern.pattern_id == a.pattern_id
        results = [m async for m in c.stream_analyze(tone(12.0, 16_000, seed=9), 16_000)]
        assert [m.is_final for m in results] == [False, False, True]
        assert await c.health() == "SERVING"
        with pytest.raises(GrymError) as err:
            await c.health("bogus")
        assert err.value.code.name == "NOT_FOUND" and "milvus" in err.value.message
        await c.delete_pattern(a.pattern_id)
        with pytest.raises(GrymError):
            await c.get_pattern(a.pattern_id)
