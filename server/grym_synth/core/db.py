"""The SQL layer shared by the stores that persist to one database (workflow records, pattern ratings).

Both speak the same SQL through :class:`Database`: one connection used by one worker thread, so the blocking
drivers never run on the event loop and writes are naturally serialised. Schema changes are numbered migrations
recorded per component in ``schema_migrations``. Backends are chosen by URL: ``sqlite:///ABSOLUTE/PATH.db`` (or a
bare path; WAL mode) or ``postgresql://...`` (psycopg 3, shared by replicas).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from grym_synth.core.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

DOWNSTREAM = "workflow-db"


def now_us() -> int:
    return time.time_ns() // 1000


def truncate(text: str | None, limit: int) -> str:
    """Bound stored text; the marker says how much was cut so a reader never mistakes it for the whole."""
    text = text or ""
    if len(text) <= limit:
        return text
    marker = f"...[truncated {len(text) - limit} chars]"
    return text[: max(0, limit - len(marker))] + marker


# --- the database --------------------------------------------------------------------
@dataclass(frozen=True)
class Migration:
    """One numbered schema change. ``{bigint}`` and ``{serial_pk}`` are filled per dialect."""

    version: int
    description: str
    statements: tuple[str, ...]


DIALECT_TYPES = {
    "sqlite": {"bigint": "INTEGER", "serial_pk": "INTEGER PRIMARY KEY AUTOINCREMENT"},
    "postgresql": {"bigint": "BIGINT", "serial_pk": "BIGSERIAL PRIMARY KEY"},
}


class Database:
    """One connection driven by one worker thread; callers ``await db.run(fn)`` with ``fn(conn)``.

    SQL is written with ``?`` placeholders and translated for psycopg. A lost Postgres connection surfaces as
    UNAVAILABLE and is re-established on the next call."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.dialect, self.target = parse_db_url(url)
        self._conn: Any = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._users = 0
        self._lock = threading.Lock()

    # lifecycle
    def open(self) -> "Database":
        """Idempotent and reference-counted, so the workflow and feedback stores can share one database."""
        with self._lock:
            self._users += 1
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grym-db")
                self._submit(self._connect).result()
        return self

    def close(self) -> None:
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self._executor is None:
                return
            executor, self._executor = self._executor, None
        executor.submit(self._disconnect).result()
        executor.shutdown(wait=True)

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.target, timeout=10.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=10000")
            self._conn = conn
        else:
            import psycopg

            self._conn = psycopg.connect(self.target, autocommit=False, connect_timeout=10)

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing is best-effort during shutdown
                log.exception("closing the workflow database failed")

    def _submit(self, fn: Callable[[], T]) -> "concurrent.futures.Future[T]":
        if self._executor is None:
            raise Unavailable(DOWNSTREAM, "the workflow database is not open")
        return self._executor.submit(fn)

    # running statements
    def sql(self, text: str) -> str:
        return text if self.dialect == "sqlite" else text.replace("?", "%s")

    def ddl(self, text: str) -> str:
        return text.format(**DIALECT_TYPES[self.dialect])

    async def run(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` in the worker thread inside one transaction (committed, or rolled back on error)."""
        future = self._submit(lambda: self._transaction(fn))
        try:
            return await asyncio.wrap_future(future)
        except (InvalidArgument, NotFound, FailedPrecondition):
            raise
        except Exception as exc:
            if self._is_unavailable(exc):
                raise Unavailable(DOWNSTREAM, str(exc)) from exc
            raise

    def run_sync(self, fn: Callable[[Any], T]) -> T:
        return self._submit(lambda: self._transaction(fn)).result()

    def _transaction(self, fn: Callable[[Any], T]) -> T:
        if self._conn is None or getattr(self._conn, "closed", False):
            self._connect()
        try:
            result = fn(self._conn)
            self._conn.commit()
            return result
        except BaseException:
            try:
                self._conn.rollback()
            except Exception:
                self._disconnect()  # a broken connection: reconnect on the next call
            raise

    def _is_unavailable(self, exc: BaseException) -> bool:
        if isinstance(exc, sqlite3.OperationalError):
            return True
        module = type(exc).__module__
        return module.startswith("psycopg") and type(exc).__name__ in ("OperationalError", "InterfaceError")

    def is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) or type(exc).__name__ in ("IntegrityError", "UniqueViolation")

    def execute(self, conn: Any, text: str, params: Sequence[Any] = ()) -> Any:
        return conn.execute(self.sql(text), tuple(params))

    # migrations
    def migrate(self, component: str, migrations: Sequence[Migration]) -> int:
        """Apply the component's migrations newer than what the database records; returns the schema version.

        Serialised across processes (BEGIN IMMEDIATE / an advisory lock) so replicas starting together do not
        race; a database newer than this build is accepted (migrations are additive) with a warning."""
        return self.run_sync(lambda conn: self._migrate(conn, component, migrations))

    def _migrate(self, conn: Any, component: str, migrations: Sequence[Migration]) -> int:
        if self.dialect == "sqlite":
            conn.commit()
            conn.execute("BEGIN IMMEDIATE")
        else:
            conn.execute("SELECT pg_advisory_xact_lock(724201)")
        self.execute(conn, self.ddl(
            "CREATE TABLE IF NOT EXISTS schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL, "
            "description TEXT NOT NULL, applied_at_us {bigint} NOT NULL, PRIMARY KEY (component, version))"))
        row = self.execute(conn, "SELECT MAX(version) FROM schema_migrations WHERE component = ?",
                           (component,)).fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version <= current:
                continue
            for statement in m.statements:
                self.execute(conn, self.ddl(statement))
            self.execute(conn, "INSERT INTO schema_migrations (component, version, description, applied_at_us) "
                               "VALUES (?, ?, ?, ?)", (component, m.version, m.description, now_us()))
            log.info("%s schema migrated to v%d (%s)", component, m.version, m.description)
            current = m.version
        known = max((m.version for m in migrations), default=0)
        if current > known:
            log.warning("%s schema is v%d, newer than this build knows (v%d)", component, current, known)
        return current


def parse_db_url(url: str) -> tuple[str, str]:
    """``sqlite:///abs/path.db`` or a bare path → ("sqlite", path); ``postgresql://...`` → ("postgresql", url)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path:
            raise InvalidArgument("a sqlite URL needs a path: sqlite:///path/to/workflows.db")
        return "sqlite", path
    if "://" in url:
        raise InvalidArgument(f"unsupported workflow database URL {url.split('://')[0]!r}://; use sqlite:/// or "
                              "postgresql://")
    return "sqlite", url


def open_database(url: str) -> Database:
    return Database(url).open()
