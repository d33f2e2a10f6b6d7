"""Persisted workflow records: what each Compose request planned, how every step went, and how it ended.

Why persist: a composition takes seconds to minutes, a client may disconnect and come back, and a crash must be
*reported* (the record becomes INTERRUPTED with a reason) rather than silently lost.

Backends are chosen by URL (:func:`open_workflow_store`):

* ``sqlite:///ABSOLUTE/PATH.db`` (or a bare path) — the embedded default: one file next to the milvus-lite data.
  WAL mode, so readers never block the writer.
* ``postgresql://user@host:port/db`` — a shared database for several orchestrator replicas (psycopg 3).

Both speak the same SQL through :class:`Database`: one connection used by one worker thread, so the blocking
drivers never run on the event loop and writes are naturally serialised. Schema changes are numbered migrations
recorded per component in ``schema_migrations`` (the feedback table of :mod:`grym_synth.memory.learning` is another
component in the same database).

Replicas and crashes: every record names its ``owner`` (a stable replica name, default the hostname) and the
running engine refreshes ``heartbeat_at_us``. At startup a replica marks INTERRUPTED what *it* left RUNNING/PENDING
plus anything whose heartbeat went stale — never a live sibling's work.
"""

from __future__ import annotations

import abc
import base64
import builtins
import json
import logging
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from grym_synth.core.db import Database, Migration, now_us, parse_db_url, truncate
from grym_synth.core.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TRANSCRIPT_CHARS = 32_768
MAX_SUMMARY_BYTES = 16_384
MAX_ERROR_CHARS = 4_096
MAX_REQUEST_CHARS = 8_192
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
# Workflow ids are issued as UUIDs (grym_synth.compose.service.new_workflow_id); the store accepts that and the short safe ids
# tools and tests use ("wf-1"). Every query passes ids as placeholders; the format check keeps arbitrary client
# text (quotes, NUL, megabytes) from reaching the database at all.
WORKFLOW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}")
DEFAULT_STALE_AFTER_S = 120.0


class WorkflowState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"


class StepState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERRUPTED = "INTERRUPTED"


ACTIVE_STATES = (WorkflowState.PENDING, WorkflowState.RUNNING)
TERMINAL_STEP_STATES = (StepState.SUCCEEDED, StepState.FAILED, StepState.CANCELLED, StepState.INTERRUPTED)


def check_workflow_id(workflow_id: object, what: str = "workflow_id") -> str:
    """The id if it has the issued format; INVALID_ARGUMENT otherwise."""
    if not workflow_id:
        raise InvalidArgument(f"{what} is required")
    if not isinstance(workflow_id, str) or not WORKFLOW_ID.fullmatch(workflow_id):
        shown = repr(workflow_id)
        shown = shown if len(shown) <= 40 else shown[:40] + "...'"
        raise InvalidArgument(f"{what} must be a workflow id as returned by Compose (a UUID), got {shown}")
    return workflow_id


def default_owner() -> str:
    """A replica's stable name: the hostname (a pod name under Kubernetes), overridable by the caller."""
    return socket.gethostname()[:128]


def bounded_json(value: Any, limit: int = MAX_SUMMARY_BYTES) -> str | None:
    """JSON for a summary column; an oversized summary is replaced by a truncated preview, never dropped."""
    if value is None:
        return None
    text = json.dumps(value, sort_keys=True, default=str)
    if len(text) <= limit:
        return text
    return json.dumps({"truncated": True, "preview": text[: limit // 2]})


@dataclass
class StepRecord:
    step_id: str
    step_type: str
    state: StepState = StepState.PENDING
    summary: dict[str, Any] | None = None
    error: str | None = None
    error_code: str | None = None
    started_at_us: int | None = None
    finished_at_us: int | None = None


@dataclass
class WorkflowRecord:
    """One Compose request as stored; ``steps`` are in plan order."""

    id: str
    request_text: str
    request_id: str
    planner: str
    plan: dict[str, Any]
    state: WorkflowState = WorkflowState.PENDING
    steps: list[StepRecord] = field(default_factory=list)
    fallback_reason: str | None = None
    error: str | None = None
    error_code: str | None = None
    summary: dict[str, Any] | None = None
    transcript_thinking: str = ""
    transcript_answer: str = ""
    owner: str = ""
    heartbeat_at_us: int = 0
    created_at_us: int = 0
    updated_at_us: int = 0
    # What the finished piece is (grym_synth.memory.music_index.MusicFields as a dict, no notes); None until a
    # successful piece was described.
    music: dict[str, Any] | None = None

    def step(self, step_id: str) -> StepRecord:
        for s in self.steps:
            if s.step_id == step_id:
                return s
        raise KeyError(step_id)


# --- the store interface -------------------------------------------------------------------------------------------
class WorkflowStore(abc.ABC):
    """What the workflow engine and the API need from persistence; backends implement it."""

    @abc.abstractmethod
    async def create(self, record: WorkflowRecord) -> None: ...

    @abc.abstractmethod
    async def update_state(self, workflow_id: str, state: WorkflowState) -> None: ...

    @abc.abstractmethod
    async def update_step(self, workflow_id: str, step: StepRecord) -> None: ...

    @abc.abstractmethod
    async def finish(self, workflow_id: str, state: WorkflowState, *, steps: Iterable[StepRecord],
                     summary: Mapping[str, Any] | None = None, error: str | None = None,
                     error_code: str | None = None) -> None:
        """The final write: workflow state and every step, in one transaction."""

    @abc.abstractmethod
    async def heartbeat(self, workflow_id: str) -> None: ...

    @abc.abstractmethod
    async def set_music(self, workflow_id: str, music: Mapping[str, Any]) -> None:
        """Record what the finished piece is: described after the workflow finished, once it is mastered."""

    @abc.abstractmethod
    async def get(self, workflow_id: str) -> WorkflowRecord: ...

    @abc.abstractmethod
    async def list(self, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "",
                   state: WorkflowState | None = None) -> tuple[list[WorkflowRecord], str]: ...

    @abc.abstractmethod
    async def mark_interrupted(self, *, owner: str | None = None, stale_after_s: float | None = None,
                               reason: str) -> builtins.list[str]: ...

    async def mark_interrupted_on_startup(self, *, owner: str | None = None,
                                          stale_after_s: float = DEFAULT_STALE_AFTER_S) -> builtins.list[str]:
        """Call once before serving: workflows this replica (``owner``) left active died with its previous
        process; workflows whose heartbeat is older than ``stale_after_s`` died with some other replica."""
        owner = owner or default_owner()
        reason = (f"interrupted: the orchestrator running this workflow stopped before it finished; found at "
                  f"startup of {owner} ({time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())})")
        return await self.mark_interrupted(owner=owner, stale_after_s=stale_after_s, reason=reason)

    @abc.abstractmethod
    def close(self) -> None: ...


# --- SQL implementation -----------------------------------------------------------------------------------------------
WORKFLOW_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "workflows and workflow_steps", (
        "CREATE TABLE workflows (id TEXT PRIMARY KEY, request_text TEXT NOT NULL, request_id TEXT NOT NULL, "
        "planner TEXT NOT NULL, fallback_reason TEXT, plan_json TEXT NOT NULL, state TEXT NOT NULL, error TEXT, "
        "error_code TEXT, summary_json TEXT, transcript_thinking TEXT NOT NULL DEFAULT '', "
        "transcript_answer TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '', "
        "heartbeat_at_us {bigint} NOT NULL DEFAULT 0, created_at_us {bigint} NOT NULL, "
        "updated_at_us {bigint} NOT NULL)",
        "CREATE INDEX workflows_newest ON workflows (created_at_us DESC, id DESC)",
        "CREATE INDEX workflows_state_newest ON workflows (state, created_at_us DESC, id DESC)",
        "CREATE TABLE workflow_steps (workflow_id TEXT NOT NULL REFERENCES workflows (id) ON DELETE CASCADE, "
        "step_id TEXT NOT NULL, position INTEGER NOT NULL, step_type TEXT NOT NULL, state TEXT NOT NULL, "
        "summary_json TEXT, error TEXT, error_code TEXT, started_at_us {bigint}, finished_at_us {bigint}, "
        "PRIMARY KEY (workflow_id, step_id))",
    )),
    Migration(2, "music description of the finished piece", (
        "ALTER TABLE workflows ADD COLUMN music_json TEXT",
    )),
)

_WF_COLUMNS = ("id, request_text, request_id, planner, fallback_reason, plan_json, state, error, error_code, "
               "summary_json, transcript_thinking, transcript_answer, owner, heartbeat_at_us, created_at_us, "
               "updated_at_us, music_json")
_STEP_COLUMNS = ("workflow_id, step_id, position, step_type, state, summary_json, error, error_code, "
                 "started_at_us, finished_at_us")
_UPSERT_STEP = (f"INSERT INTO workflow_steps ({_STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (workflow_id, step_id) DO UPDATE SET state = excluded.state, "
                "summary_json = excluded.summary_json, error = excluded.error, error_code = excluded.error_code, "
                "started_at_us = excluded.started_at_us, finished_at_us = excluded.finished_at_us")


class SqlWorkflowStore(WorkflowStore):
    """The SQL backend for both SQLite and PostgreSQL."""

    def __init__(self, db: Database | str) -> None:
        self.db = db if isinstance(db, Database) else Database(db)
        self._opened = False

    def open(self) -> "SqlWorkflowStore":
        self.db.open()
        self._opened = True
        self.db.migrate("workflows", WORKFLOW_MIGRATIONS)
        return self

    def close(self) -> None:
        if self._opened:
            self._opened = False
            self.db.close()

    # writes
    async def create(self, record: WorkflowRecord) -> None:
        check_workflow_id(record.id)
        created = record.created_at_us or now_us()
        record.created_at_us = record.updated_at_us = created
        record.heartbeat_at_us = created
        record.owner = record.owner or default_owner()
        row = (record.id, truncate(record.request_text, MAX_REQUEST_CHARS), record.request_id, record.planner,
               record.fallback_reason, json.dumps(record.plan, sort_keys=True), record.state.value,
               _err(record.error), record.error_code, bounded_json(record.summary),
               truncate(record.transcript_thinking, MAX_TRANSCRIPT_CHARS),
               truncate(record.transcript_answer, MAX_TRANSCRIPT_CHARS), record.owner, created, created, created,
               _music_json(record.music))

        def op(conn: Any) -> None:
            try:
                self.db.execute(conn, f"INSERT INTO workflows ({_WF_COLUMNS}) VALUES "
                                      f"({', '.join('?' * 17)})", row)
            except Exception as exc:
                if self.db.is_integrity_error(exc):
                    raise FailedPrecondition(f"workflow {record.id!r} already exists") from exc
                raise
            for position, step in enumerate(record.steps):
                self.db.execute(conn, _UPSERT_STEP, _step_row(record.id, position, step))

        await self.db.run(op)

    async def update_state(self, workflow_id: str, state: WorkflowState) -> None:
        check_workflow_id(workflow_id)
        def op(conn: Any) -> None:
            cur = self.db.execute(conn, "UPDATE workflows SET state = ?, updated_at_us = ?, heartbeat_at_us = ? "
                                        "WHERE id = ?", (state.value, now_us(), now_us(), workflow_id))
            _require_row(cur, workflow_id)

        await self.db.run(op)

    async def update_step(self, workflow_id: str, step: StepRecord) -> None:
        check_workflow_id(workflow_id)
        def op(conn: Any) -> None:
            self.db.execute(conn, _UPSERT_STEP, _step_row(workflow_id, self._position(conn, workflow_id, step),
                                                          step))
            self.db.execute(conn, "UPDATE workflows SET updated_at_us = ? WHERE id = ?", (now_us(), workflow_id))

        await self.db.run(op)

    def _position(self, conn: Any, workflow_id: str, step: StepRecord) -> int:
        row = self.db.execute(conn, "SELECT position FROM workflow_steps WHERE workflow_id = ? AND step_id = ?",
                              (workflow_id, step.step_id)).fetchone()
        if row:
            return int(row[0])
        row = self.db.execute(conn, "SELECT COUNT(*) FROM workflow_steps WHERE workflow_id = ?",
                              (workflow_id,)).fetchone()
        return int(row[0])

    async def finish(self, workflow_id: str, state: WorkflowState, *, steps: Iterable[StepRecord],
                     summary: Mapping[str, Any] | None = None, error: str | None = None,
                     error_code: str | None = None) -> None:
        check_workflow_id(workflow_id)
        steps = list(steps)

        def op(conn: Any) -> None:
            at = now_us()
            cur = self.db.execute(conn, "UPDATE workflows SET state = ?, summary_json = ?, error = ?, error_code = ?, "
                                        "updated_at_us = ?, heartbeat_at_us = ? WHERE id = ?",
                                  (state.value, bounded_json(dict(summary) if summary is not None else None),
                                   _err(error), error_code, at, at, workflow_id))
            _require_row(cur, workflow_id)
            for step in steps:
                self.db.execute(conn, _UPSERT_STEP, _step_row(workflow_id, self._position(conn, workflow_id, step),
                                                              step))

        await self.db.run(op)

    async def set_music(self, workflow_id: str, music: Mapping[str, Any]) -> None:
        check_workflow_id(workflow_id)

        def op(conn: Any) -> None:
            cur = self.db.execute(conn, "UPDATE workflows SET music_json = ?, updated_at_us = ? WHERE id = ?",
                                  (_music_json(music), now_us(), workflow_id))
            _require_row(cur, workflow_id)

        await self.db.run(op)

    async def heartbeat(self, workflow_id: str) -> None:
        check_workflow_id(workflow_id)
        await self.db.run(lambda conn: self.db.execute(
            conn, "UPDATE workflows SET heartbeat_at_us = ? WHERE id = ?", (now_us(), workflow_id)))

    async def mark_interrupted(self, *, owner: str | None = None, stale_after_s: float | None = None,
                               reason: str) -> list[str]:
        """Mark active workflows of ``owner`` and/or with a stale heartbeat INTERRUPTED (steps too)."""
        clauses: list[str] = []
        params: list[Any] = []
        if owner is not None:
            clauses.append("owner = ?")
            params.append(owner)
        if stale_after_s is not None:
            clauses.append("heartbeat_at_us < ?")
            params.append(now_us() - int(stale_after_s * 1e6))
        if not clauses:
            raise InvalidArgument("mark_interrupted needs an owner or a staleness bound")
        where = f"state IN ('PENDING', 'RUNNING') AND ({' OR '.join(clauses)})"

        def op(conn: Any) -> list[str]:
            ids = [str(r[0]) for r in self.db.execute(conn, f"SELECT id FROM workflows WHERE {where}",
                                                      params).fetchall()]
            at = now_us()
            for wid in ids:
                self.db.execute(conn, "UPDATE workflows SET state = 'INTERRUPTED', error = ?, error_code = ?, "
                                      "updated_at_us = ? WHERE id = ?", (_err(reason), "ABORTED", at, wid))
                self.db.execute(conn, "UPDATE workflow_steps SET state = 'INTERRUPTED', error = ?, "
                                      "finished_at_us = ? WHERE workflow_id = ? AND state IN ('PENDING', 'RUNNING')",
                                (_err(reason), at, wid))
            return ids

        ids = await self.db.run(op)
        for wid in ids:
            log.warning("workflow %s marked INTERRUPTED: %s", wid, reason)
        return ids

    # reads
    def count_sync(self) -> int:
        """How many workflow records the history holds (the pattern store's integrity check at start-up)."""
        row = self.db.run_sync(lambda conn: self.db.execute(conn, "SELECT COUNT(*) FROM workflows").fetchone())
        return int(row[0]) if row else 0

    async def get(self, workflow_id: str) -> WorkflowRecord:
        check_workflow_id(workflow_id)
        def op(conn: Any) -> WorkflowRecord:
            row = self.db.execute(conn, f"SELECT {_WF_COLUMNS} FROM workflows WHERE id = ?",
                                  (workflow_id,)).fetchone()
            if row is None:
                raise NotFound(f"workflow {workflow_id!r} does not exist")
            record = _record_from_row(row)
            record.steps = self._steps(conn, [workflow_id])[workflow_id]
            return record

        return await self.db.run(op)

    async def list(self, *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = "",
                   state: WorkflowState | None = None) -> tuple[list[WorkflowRecord], str]:
        """Newest first; keyset pagination, so pages stay stable while new workflows arrive."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        state_value = WorkflowState(state).value if state else ""
        after = _decode_token(page_token, state_value) if page_token else None
        clauses: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state_value:
            clauses.append("state = ?")
            params.append(state_value)
        if after:
            clauses.append("(created_at_us < ? OR (created_at_us = ? AND id < ?))")
            params.extend([after[0], after[0], after[1]])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def op(conn: Any) -> list[WorkflowRecord]:
            rows = self.db.execute(conn, f"SELECT {_WF_COLUMNS} FROM workflows {where} "
                                         "ORDER BY created_at_us DESC, id DESC LIMIT ?",
                                   [*params, page_size + 1]).fetchall()
            records = [_record_from_row(r) for r in rows]
            steps = self._steps(conn, [r.id for r in records[:page_size]])
            for r in records[:page_size]:
                r.steps = steps[r.id]
            return records

        records = await self.db.run(op)
        if len(records) <= page_size:
            return records, ""
        last = records[page_size - 1]
        return records[:page_size], _encode_token(last.created_at_us, last.id, state_value)

    def _steps(self, conn: Any, ids: Sequence[str]) -> dict[str, builtins.list[StepRecord]]:
        out: dict[str, builtins.list[StepRecord]] = {i: [] for i in ids}
        if not ids:
            return out
        marks = ", ".join("?" * len(ids))
        rows = self.db.execute(conn, f"SELECT {_STEP_COLUMNS} FROM workflow_steps WHERE workflow_id IN ({marks}) "
                                     "ORDER BY workflow_id, position", list(ids)).fetchall()
        for r in rows:
            out[str(r[0])].append(StepRecord(
                step_id=str(r[1]), step_type=str(r[3]), state=StepState(r[4]), summary=_loads(r[5]), error=r[6],
                error_code=r[7], started_at_us=r[8], finished_at_us=r[9]))
        return out


class SqliteWorkflowStore(SqlWorkflowStore):
    """The embedded default: a SQLite file (WAL) on local disk."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(Database(f"sqlite://{Path(path).resolve()}"))


class PostgresWorkflowStore(SqlWorkflowStore):
    """A shared PostgreSQL database, for several orchestrator replicas."""

    def __init__(self, url: str) -> None:
        if parse_db_url(url)[0] != "postgresql":
            raise InvalidArgument(f"not a postgresql URL: {url!r}")
        super().__init__(Database(url))


def open_workflow_store(url: str) -> SqlWorkflowStore:
    """Open (and migrate) the store the URL names: ``sqlite:///path.db`` (default) or ``postgresql://...``."""
    dialect, target = parse_db_url(url)
    store = SqliteWorkflowStore(target) if dialect == "sqlite" else PostgresWorkflowStore(target)
    return store.open()


# --- row helpers ----------------------------------------------------------------------------------------------------
def _step_row(workflow_id: str, position: int, s: StepRecord) -> tuple[Any, ...]:
    return (workflow_id, s.step_id, position, s.step_type, StepState(s.state).value, bounded_json(s.summary),
            _err(s.error), s.error_code, s.started_at_us, s.finished_at_us)


def _record_from_row(r: Sequence[Any]) -> WorkflowRecord:
    return WorkflowRecord(
        id=str(r[0]), request_text=r[1], request_id=r[2], planner=r[3], fallback_reason=r[4], plan=json.loads(r[5]),
        state=WorkflowState(r[6]), error=r[7], error_code=r[8], summary=_loads(r[9]), transcript_thinking=r[10],
        transcript_answer=r[11], owner=r[12], heartbeat_at_us=int(r[13]), created_at_us=int(r[14]),
        updated_at_us=int(r[15]), music=_loads(r[16]))


def _music_json(music: Mapping[str, Any] | None) -> str | None:
    return json.dumps(dict(music), sort_keys=True) if music else None


def _loads(text: str | None) -> Any:
    return json.loads(text) if text else None


def _err(text: str | None) -> str | None:
    return truncate(text, MAX_ERROR_CHARS) if text is not None else None


def _require_row(cursor: Any, workflow_id: str) -> None:
    if cursor.rowcount == 0:
        raise NotFound(f"workflow {workflow_id!r} does not exist")


def _encode_token(created_at_us: int, workflow_id: str, state: str) -> str:
    raw = json.dumps({"c": created_at_us, "i": workflow_id, "s": state}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_token(token: str, state: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        after = (int(data["c"]), str(data["i"]))
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not a token returned by ListWorkflows") from None
    if data.get("s", "") != state:
        raise InvalidArgument("page_token belongs to a different state filter; start again without a token")
    return after
