"""Workflow records on SQLite (the embedded default) and on a real PostgreSQL server started for this module.

The PostgreSQL tests need the server binaries (Debian: ``apt-get install postgresql``) and psycopg; they skip,
saying why, when either is missing. Starting the server takes about a second.
"""

from __future__ import annotations

import asyncio
import glob
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from grym_synth.core.errors import FailedPrecondition, InvalidArgument, NotFound
from grym_synth.memory.learning import FeedbackStore
from grym_synth.workflow.store import (MAX_TRANSCRIPT_CHARS, SqliteWorkflowStore, StepRecord, StepState,
                                   WorkflowRecord, WorkflowState, open_workflow_store, parse_db_url)

ROOT = Path(__file__).resolve().parents[2]


# --- a real PostgreSQL ------------------------------------------------------------------------------------------------
def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on loopback (trust auth, fsync off); yields its base URL."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg not installed (pip install 'psycopg[binary]')")
    root = Path(tempfile.mkdtemp(prefix="grym-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data, logfile = _free_port(), root / "data", root / "server.log"
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "grym", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(logfile), "-w", "-t", "60", "-o", options,
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://grym@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-w", "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server: str) -> Iterator[str]:
    """A fresh database per test."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"{postgres_server}/{name}"
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'workflows.db'}"
    return str(request.getfixturevalue("pg_url"))


# --- helpers ----------------------------------------------------------------------------------------------------------
def record(workflow_id: str, *, owner: str = "replica-a", created_at_us: int = 0,
           state: WorkflowState = WorkflowState.PENDING) -> WorkflowRecord:
    return WorkflowRecord(
        id=workflow_id, request_text=f"calm piano ({workflow_id})", request_id=f"req-{workflow_id}", planner="rules",
        plan={"version": 1, "intent": "x", "steps": []}, state=state, owner=owner, created_at_us=created_at_us,
        fallback_reason="no JSON in the answer",
        steps=[StepRecord("gen", "generate"), StepRecord("ana", "analyze")])


# --- tests ------------------------------------------------------------------------------------------------------------
async def test_roundtrip_and_step_updates(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        await store.create(record("wf-1"))
        await store.update_state("wf-1", WorkflowState.RUNNING)
        await store.update_step("wf-1", StepRecord("gen", "generate", StepState.SUCCEEDED,
                                                   summary={"audio": {"shape": [16000]}}, started_at_us=1,
                                                   finished_at_us=2))
        got = await store.get("wf-1")
        assert got.state == WorkflowState.RUNNING and got.planner == "rules"
        assert got.fallback_reason == "no JSON in the answer" and got.request_id == "req-wf-1"
        assert [s.step_id for s in got.steps] == ["gen", "ana"], "steps keep plan order"
        assert got.step("gen").state == StepState.SUCCEEDED and got.step("gen").summary == {"audio": {"shape": [16000]}}
        assert got.step("ana").state == StepState.PENDING
        await store.finish("wf-1", WorkflowState.FAILED, steps=[StepRecord(
            "ana", "analyze", StepState.FAILED, error="wav2vec2 is unavailable", error_code="UNAVAILABLE")],
            summary={"audio_s": 0}, error="step 'ana' failed", error_code="UNAVAILABLE")
        done = await store.get("wf-1")
        assert done.state == WorkflowState.FAILED and done.error_code == "UNAVAILABLE"
        assert done.step("ana").error == "wav2vec2 is unavailable" and done.summary == {"audio_s": 0}
        assert done.updated_at_us >= done.created_at_us
    finally:
        store.close()


async def test_errors(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        await store.create(record("wf-1"))
        with pytest.raises(FailedPrecondition):
            await store.create(record("wf-1"))
        with pytest.raises(NotFound):
            await store.get("nope")
        with pytest.raises(NotFound):
            await store.update_state("nope", WorkflowState.RUNNING)
        with pytest.raises(InvalidArgument):
            await store.list(page_size=0)
        with pytest.raises(InvalidArgument):
            await store.list(page_size=5, page_token="garbage!")
    finally:
        store.close()


async def test_persists_across_reopen(db_url: str) -> None:
    store = open_workflow_store(db_url)
    await store.create(record("wf-keep"))
    await store.finish("wf-keep", WorkflowState.SUCCEEDED, steps=[StepRecord("gen", "generate", StepState.SUCCEEDED)],
                       summary={"patterns": ["p1"]})
    store.close()
    reopened = open_workflow_store(db_url)
    try:
        got = await reopened.get("wf-keep")
        assert got.state == WorkflowState.SUCCEEDED and got.summary == {"patterns": ["p1"]}
        assert got.step("gen").state == StepState.SUCCEEDED
    finally:
        reopened.close()


async def test_list_newest_first_with_pages_and_state_filter(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        for i in range(7):
            await store.create(record(f"wf-{i}", created_at_us=1_000_000 + i * (i % 3 != 0)))  # ties on purpose
        await store.finish("wf-5", WorkflowState.SUCCEEDED, steps=[])
        await store.finish("wf-2", WorkflowState.SUCCEEDED, steps=[])
        seen: list[str] = []
        token = ""
        while True:
            page, token = await store.list(page_size=3, page_token=token)
            seen.extend(r.id for r in page)
            if not token:
                break
        # wf-0, wf-3 and wf-6 share a timestamp: ties are broken by id (descending), across page boundaries.
        assert seen == ["wf-5", "wf-4", "wf-2", "wf-1", "wf-6", "wf-3", "wf-0"]
        succeeded, token = await store.list(page_size=10, state=WorkflowState.SUCCEEDED)
        assert [r.id for r in succeeded] == ["wf-5", "wf-2"] and token == ""
        assert all(len(r.steps) in (0, 2) for r in succeeded)
        first, token = await store.list(page_size=1, state=WorkflowState.SUCCEEDED)
        with pytest.raises(InvalidArgument, match="different state filter"):
            await store.list(page_size=1, page_token=token)
    finally:
        store.close()


async def test_transcript_is_bounded(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        rec = record("wf-t")
        rec.transcript_thinking = "t" * (MAX_TRANSCRIPT_CHARS * 2)
        rec.transcript_answer = "```json\n{}\n```"
        await store.create(rec)
        got = await store.get("wf-t")
        assert len(got.transcript_thinking) == MAX_TRANSCRIPT_CHARS
        assert got.transcript_thinking.endswith(f"[truncated {MAX_TRANSCRIPT_CHARS * 2 - MAX_TRANSCRIPT_CHARS} chars]")
        assert got.transcript_answer == "```json\n{}\n```"
    finally:
        store.close()


async def test_mark_interrupted_touches_only_own_or_stale_work(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        await store.create(record("mine", owner="replica-a"))
        await store.update_state("mine", WorkflowState.RUNNING)
        await store.update_step("mine", StepRecord("gen", "generate", StepState.RUNNING))
        await store.create(record("sibling", owner="replica-b"))
        await store.update_state("sibling", WorkflowState.RUNNING)
        await store.create(record("finished", owner="replica-a"))
        await store.finish("finished", WorkflowState.SUCCEEDED, steps=[])
        marked = await store.mark_interrupted_on_startup(owner="replica-a", stale_after_s=3600)
        assert marked == ["mine"]
        mine = await store.get("mine")
        assert mine.state == WorkflowState.INTERRUPTED and "interrupted" in (mine.error or "")
        assert mine.step("gen").state == StepState.INTERRUPTED and mine.step("ana").state == StepState.INTERRUPTED
        assert (await store.get("sibling")).state == WorkflowState.RUNNING, "a live sibling's work is left alone"
        assert (await store.get("finished")).state == WorkflowState.SUCCEEDED
        await asyncio.sleep(0.05)
        assert await store.mark_interrupted_on_startup(owner="replica-c", stale_after_s=0.01) == ["sibling"]
        with pytest.raises(InvalidArgument):
            await store.mark_interrupted(reason="x")
    finally:
        store.close()


CRASH_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from grym_synth.planning.validation import validate_plan
    from grym_synth.workflow.engine import WorkflowEngine
    from grym_synth.workflow.store import open_workflow_store

    async def hang(step, inputs, ctx):
        print("RUNNING", flush=True)
        await asyncio.Event().wait()

    async def main():
        store = open_workflow_store({url!r})
        engine = WorkflowEngine({{"generate": hang}}, store, owner="replica-a")
        plan = validate_plan({{"version": 1, "intent": "crash", "steps": [
            {{"id": "gen", "type": "generate", "params": {{"prompt": "x"}}}}]}})
        await engine.start(plan, request_text="crash test", request_id="req-crash", workflow_id="wf-crash")
        await asyncio.Event().wait()

    asyncio.run(main())
""")


async def test_crashed_process_is_reported_interrupted_on_restart(db_url: str) -> None:
    """A real orchestrator-like process is SIGKILLed mid-step; the restarted replica reports the crash."""
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT.format(root=str(ROOT), url=db_url)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.strip() == "RUNNING", proc.stderr.read() if proc.poll() is not None else line  # type: ignore
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = open_workflow_store(db_url)
    try:
        before = await store.get("wf-crash")
        assert before.state == WorkflowState.RUNNING and before.step("gen").state == StepState.RUNNING
        assert await store.mark_interrupted_on_startup(owner="replica-a") == ["wf-crash"]
        after = await store.get("wf-crash")
        assert after.state == WorkflowState.INTERRUPTED and after.error_code == "ABORTED"
        assert "stopped before it finished" in (after.error or "")
        assert after.step("gen").state == StepState.INTERRUPTED
    finally:
        store.close()


async def test_feedback_shares_the_database(db_url: str) -> None:
    store = open_workflow_store(db_url)
    feedback = FeedbackStore(store.db).open()
    try:
        await feedback.rate("p1", 5, "lovely")
        await feedback.rate("p1", 2)
        assert (await feedback.ratings(["p1", "p2"]))["p1"].mean == 3.5
        versions = await store.db.run(lambda conn: store.db.execute(
            conn, "SELECT component, version FROM schema_migrations ORDER BY component").fetchall())
        assert [tuple(v) for v in versions] == [("feedback", 1), ("workflows", 1), ("workflows", 2)]
    finally:
        feedback.close()
        store.close()


def test_sqlite_is_wal_and_migrations_apply_once(tmp_path: Path) -> None:
    path = tmp_path / "wf.db"
    for _ in range(2):
        SqliteWorkflowStore(path).open().close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT component, version FROM schema_migrations ORDER BY version").fetchall()
    assert rows == [("workflows", 1), ("workflows", 2)]


MUSIC = {"tempo_bpm": 120.0, "tempo_confidence": 0.8, "key": "A minor", "key_confidence": 0.7,
         "tags": [["ambient", 0.9, 2]], "vocal_segments": [], "embedding": None, "models": "musicnn"}


async def test_music_of_the_finished_piece_is_stored(db_url: str) -> None:
    store = open_workflow_store(db_url)
    try:
        await store.create(record("wf-music"))
        assert (await store.get("wf-music")).music is None
        await store.set_music("wf-music", MUSIC)
        assert (await store.get("wf-music")).music == MUSIC
        records, _ = await store.list()
        assert records[0].music == MUSIC
        with pytest.raises(NotFound):
            await store.set_music("wf-absent", MUSIC)
    finally:
        store.close()


async def test_a_version_1_database_gains_the_music_column(tmp_path: Path) -> None:
    """An existing database from before the music column: its records read back, and take a description."""
    from grym_synth.workflow.store import WORKFLOW_MIGRATIONS, Database
    path = tmp_path / "old.db"
    old = Database(f"sqlite://{path}")
    old.open()
    old.migrate("workflows", WORKFLOW_MIGRATIONS[:1])
    old.run_sync(lambda conn: old.execute(
        conn, "INSERT INTO workflows (id, request_text, request_id, planner, plan_json, state, created_at_us, "
              "updated_at_us) VALUES ('wf-old', 'x', 'r', 'rules', '{}', 'SUCCEEDED', 1, 1)"))
    old.close()
    store = SqliteWorkflowStore(path).open()
    try:
        assert (await store.get("wf-old")).music is None
        await store.set_music("wf-old", MUSIC)
        assert (await store.get("wf-old")).music == MUSIC
    finally:
        store.close()


def test_database_urls(tmp_path: Path) -> None:
    assert parse_db_url("sqlite:///var/lib/grym/wf.db") == ("sqlite", "/var/lib/grym/wf.db")
    assert parse_db_url(str(tmp_path / "x.db")) == ("sqlite", str(tmp_path / "x.db"))
    assert parse_db_url("postgresql://grym@db:5432/grym")[0] == "postgresql"
    assert parse_db_url("postgres://grym@db/grym")[0] == "postgresql"
    with pytest.raises(InvalidArgument, match="unsupported"):
        parse_db_url("mysql://db/grym")
    with pytest.raises(InvalidArgument, match="needs a path"):
        parse_db_url("sqlite://")
    store = open_workflow_store(str(tmp_path / "sub" / "bare.db"))
    store.close()
    assert (tmp_path / "sub" / "bare.db").exists()


async def test_concurrent_writes_are_serialised(tmp_path: Path) -> None:
    store = open_workflow_store(f"sqlite://{tmp_path / 'wf.db'}")
    try:
        await asyncio.gather(*(store.create(record(f"wf-{i}")) for i in range(40)))
        t0 = time.monotonic()
        await asyncio.gather(*(store.heartbeat(f"wf-{i}") for i in range(40)))
        assert time.monotonic() - t0 < 10
        page, _ = await store.list(page_size=100)
        assert len(page) == 40
    finally:
        store.close()
