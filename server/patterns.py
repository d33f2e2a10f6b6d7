"""Pattern memory: audio embeddings and their provenance in Milvus.

One collection per (model, profile): embeddings of different models or sizes live in different spaces and have
different dimensions, so mixing them would make similarity meaningless. The same code talks to a milvus-lite file
(the default) or a Milvus server/cluster (``--milvus-uri http://host:19530``).

pymilvus is synchronous; every call runs in a worker thread so the event loop keeps serving. Searches ask only
for the scalar fields they return: fetching vectors made a milvus-lite search ~60x slower.

A store may own a :class:`~server.recall_index.RecallIndex` (the orchestrator's does): text recall then reads
memory instead of Milvus, and the store keeps it current by telling it about every insert and delete once Milvus
has accepted it. The store is the one place that writes patterns, so this is the one place that can.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from server.errors import InvalidArgument, NotFound, Unavailable
from server.resilience import AsyncBreaker

if TYPE_CHECKING:
    from server.recall_index import RecallIndex

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TAGS = 32
MAX_TAG_VALUE = 256
MAX_META_BYTES = 16_384
MAX_TOP_K = 100
MAX_PAGE_SIZE = 1000
SCALAR_FIELDS = ["id", "model", "profile", "duration_s", "tags", "created_at_us", "source", "metadata"]


@dataclass
class PatternRecord:
    """A stored pattern as the service layer sees it."""

    id: str
    model: str
    profile: str
    duration_s: float
    tags: dict[str, str]
    created_at_us: int
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    embedding: list[float] | None = None
    score: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "PatternRecord":
        entity = row.get("entity", row)
        emb = entity.get("embedding")
        return cls(
            id=str(entity["id"]),
            model=str(entity.get("model", "")),
            profile=str(entity.get("profile", "")),
            duration_s=float(entity.get("duration_s", 0.0)),
            tags=dict(entity.get("tags") or {}),
            created_at_us=int(entity.get("created_at_us", 0)),
            source=str(entity.get("source", "")),
            metadata=dict(entity.get("metadata") or {}),
            embedding=[float(x) for x in emb] if emb is not None else None,
            score=float(row["distance"]) if "distance" in row else None,
        )


def validate_tags(tags: Mapping[str, str], what: str = "tags") -> dict[str, str]:
    """Tags become filter expressions, so keys are restricted to a safe alphabet and sizes are bounded."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{what} has {len(tags)} entries; at most {MAX_TAGS} are allowed")
    for key, value in tags.items():
        if not TAG_KEY.match(key):
            raise InvalidArgument(f"{what} key {key!r} must be 1-64 characters of letters, digits, '_', '.', '-'")
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgument(f"{what}[{key}] is {len(value)} characters; at most {MAX_TAG_VALUE} are allowed")
    return dict(tags)


def tag_filter_expr(tags: Mapping[str, str]) -> str:
    """A Milvus boolean expression matching all tags; values are JSON-quoted (milvus-lite has no templates)."""
    validate_tags(tags, "tag_filter")
    return " and ".join(f'tags["{k}"] == {json.dumps(v)}' for k, v in sorted(tags.items()))


def _encode_page_token(offset: int, filter_expr: str) -> str:
    raw = json.dumps({"o": offset, "f": filter_expr}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_page_token(token: str, filter_expr: str) -> int:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset = int(data["o"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("page_token is not a token returned by ListPatterns") from None
    if data.get("f") != filter_expr or offset < 0:
        raise InvalidArgument("page_token belongs to a different tag_filter; start again without a token")
    return offset


class PatternStore:
    """CRUD and similarity search over stored patterns."""

    def __init__(self, uri: str, *, dim: int, model: str, profile: str, collection_prefix: str = "grym_patterns",
                 token: str | None = None, breaker: AsyncBreaker | None = None,
                 recall_index: RecallIndex | None = None) -> None:
        self.uri = uri
        self.token = token
        self.dim = dim
        self.model = model
        self.profile = profile
        self.collection = f"{collection_prefix}_{model}_{profile}".replace("-", "_")
        self._client: Any = None
        self._lock = threading.Lock()  # milvus-lite's local engine is not safe for concurrent writers
        self.ready = False
        # Trips on Milvus failures (not on bad requests), so an outage answers UNAVAILABLE at once.
        self.breaker = breaker or AsyncBreaker("milvus", exclude=[InvalidArgument, NotFound])
        # Text recall's in-memory view of this store (None: recall queries Milvus); loaded and reconciled by
        # RecallIndex.keep_in_sync, told about this store's writes below.
        self.recall_index = recall_index

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, create the collection on first use, and load it (a reopened collection must be loaded)."""
        from pymilvus import MilvusClient

        if "://" not in self.uri:
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        self._client = MilvusClient(self.uri, token=self.token or "")
        if not self._client.has_collection(self.collection):
            self._create_collection()
        else:
            self._check_dimension()
        self._client.load_collection(self.collection)
        self.ready = True
        log.info("pattern store %s ready at %s (%d patterns)", self.collection, self.uri, self.count_sync())

    def _create_collection(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("model", DataType.VARCHAR, max_length=64)
        schema.add_field("profile", DataType.VARCHAR, max_length=32)
        schema.add_field("duration_s", DataType.DOUBLE)
        schema.add_field("tags", DataType.JSON)
        schema.add_field("created_at_us", DataType.INT64)
        schema.add_field("source", DataType.VARCHAR, max_length=256)
        schema.add_field("metadata", DataType.JSON)
        index = self._client.prepare_index_params()
        # FLAT is exact; at the sizes a single host keeps it is fast enough and never misses a neighbour.
        index.add_index(field_name="embedding", index_type="FLAT", metric_type="COSINE")
        self._client.create_collection(self.collection, schema=schema, index_params=index)

    def _check_dimension(self) -> None:
        desc = self._client.describe_collection(self.collection)
        for f in desc.get("fields", []):
            if f.get("name") == "embedding":
                dim = int(f.get("params", {}).get("dim", self.dim))
                if dim != self.dim:
                    raise RuntimeError(
                        f"collection {self.collection} holds {dim}-dimensional embeddings but the served model "
                        f"produces {self.dim}; use another --collection-prefix or data dir"
                    )

    def close(self) -> None:
        client, self._client = self._client, None
        self.ready = False
        if client is not None:
            try:
                client.close()
            except Exception:  # closing is best-effort during shutdown
                log.exception("closing the pattern store failed")

    # --- helpers ------------------------------------------------------------------------------------------------
    async def _run(self, fn: Callable[[], T]) -> T:
        if self._client is None:
            raise Unavailable("milvus", "the pattern store is not open")

        def locked() -> T:
            with self._lock:
                return fn()

        async def call() -> T:
            try:
                return await asyncio.to_thread(locked)
            except (InvalidArgument, NotFound):
                raise
            except Exception as exc:
                if _is_connection_error(exc):
                    raise Unavailable("milvus", str(exc)) from exc
                raise

        return await self.breaker.call(call)

    def check_vector(self, vector: Sequence[float], what: str = "embedding") -> list[float]:
        if len(vector) != self.dim:
            raise InvalidArgument(
                f"{what} has {len(vector)} dimensions; the served model ({self.model}, {self.profile}) uses {self.dim}"
            )
        arr = np.asarray(vector, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InvalidArgument(f"{what} contains NaN or infinite values")
        if not np.any(arr):
            raise InvalidArgument(f"{what} is all zeros; cosine similarity is undefined for it")
        return arr.tolist()

    # --- operations ---------------------------------------------------------------------------------------------
    async def insert(self, embedding: Sequence[float], *, duration_s: float, tags: Mapping[str, str], source: str,
                     metadata: Mapping[str, str] | None = None) -> PatternRecord:
        vector = self.check_vector(embedding)
        tags = validate_tags(tags)
        meta = dict(metadata or {})
        if len(json.dumps(meta)) > MAX_META_BYTES:
            raise InvalidArgument(f"pattern metadata exceeds {MAX_META_BYTES} bytes")
        record = PatternRecord(
            id=str(uuid.uuid4()), model=self.model, profile=self.profile, duration_s=float(duration_s), tags=tags,
            created_at_us=time.time_ns() // 1000, source=source[:256], metadata=meta,
        )
        row = {**{k: getattr(record, k) for k in ("id", "model", "profile", "duration_s", "tags", "created_at_us",
                                                   "source", "metadata")}, "embedding": vector}
        await self._run(lambda: self._client.insert(self.collection, [row]))
        if self.recall_index is not None:
            self.recall_index.add(record)
        return record

    async def get(self, pattern_id: str, *, include_embedding: bool = False) -> PatternRecord:
        fields = SCALAR_FIELDS + (["embedding"] if include_embedding else [])
        rows = await self._run(lambda: self._client.get(self.collection, ids=[pattern_id], output_fields=fields))
        if not rows:
            raise NotFound(f"pattern {pattern_id!r} does not exist")
        return PatternRecord.from_row(rows[0])

    async def delete(self, pattern_id: str) -> None:
        def op() -> bool:
            if not self._client.get(self.collection, ids=[pattern_id], output_fields=["id"]):
                return False
            self._client.delete(self.collection, ids=[pattern_id])
            return True

        if not await self._run(op):
            raise NotFound(f"pattern {pattern_id!r} does not exist")
        if self.recall_index is not None:
            self.recall_index.remove(pattern_id)

    async def search(self, vector: Sequence[float], *, top_k: int, tag_filter: Mapping[str, str] | None = None,
                     exclude_id: str | None = None, include_embedding: bool = False) -> list[PatternRecord]:
        vec = self.check_vector(vector)
        if not 1 <= top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k must be 1..{MAX_TOP_K}, got {top_k}")
        clauses = [tag_filter_expr(tag_filter)] if tag_filter else []
        if exclude_id:
            clauses.append(f"id != {json.dumps(exclude_id)}")
        expr = " and ".join(clauses)
        rows = await self._run(lambda: self._client.search(
            self.collection, data=[vec], limit=top_k, filter=expr, output_fields=SCALAR_FIELDS,
            search_params={"metric_type": "COSINE"},
        ))
        found = [PatternRecord.from_row(r) for r in rows[0]] if rows else []
        if include_embedding and found:
            full = {p.id: p for p in await self.get_many([p.id for p in found], include_embedding=True)}
            for p in found:
                p.embedding = full[p.id].embedding if p.id in full else None
        return found

    async def get_many(self, ids: Sequence[str], *, include_embedding: bool = False) -> list[PatternRecord]:
        if not ids:
            return []
        fields = SCALAR_FIELDS + (["embedding"] if include_embedding else [])
        return await self._run(lambda: _records(self._client.get(self.collection, ids=list(ids),
                                                                 output_fields=fields)))

    async def list(self, *, page_size: int, page_token: str = "",
                   tag_filter: Mapping[str, str] | None = None) -> tuple[list[PatternRecord], str]:
        """Newest first. Milvus has no ORDER BY, so ids and timestamps of the matching rows are sorted here;
        that is O(matching rows) of two scalar columns per page, fine for a single host's pattern memory."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        expr = tag_filter_expr(tag_filter) if tag_filter else ""
        offset = _decode_page_token(page_token, expr) if page_token else 0
        keys = await self._run(lambda: self._all_keys(expr))
        keys.sort(key=lambda r: (-int(r["created_at_us"]), str(r["id"])))
        page_ids = [str(r["id"]) for r in keys[offset: offset + page_size]]
        records = {p.id: p for p in await self.get_many(page_ids)}
        page = [records[i] for i in page_ids if i in records]
        next_offset = offset + page_size
        return page, (_encode_page_token(next_offset, expr) if next_offset < len(keys) else "")

    def _all_keys(self, expr: str) -> list[dict[str, Any]]:
        return self._iterate(expr, ["id", "created_at_us"])

    def _iterate(self, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        it = self._client.query_iterator(self.collection, batch_size=4096, filter=expr, output_fields=fields)
        out: list[dict[str, Any]] = []
        try:
            while batch := it.next():
                out.extend(batch)
        finally:
            it.close()
        return out

    async def query(self, expr: str, *, limit: int, include_embedding: bool = False) -> list[PatternRecord]:
        """Patterns matching a Milvus boolean expression (scalar fields; vectors only when asked)."""
        fields = SCALAR_FIELDS + (["embedding"] if include_embedding else [])
        return await self._run(lambda: _records(self._client.query(self.collection, filter=expr,
                                                                   output_fields=fields, limit=limit)))

    async def all_records(self) -> list[PatternRecord]:
        """Every stored pattern's scalar fields, never the vectors (the recall index's full load)."""
        return await self._run(lambda: _records(self._iterate("", SCALAR_FIELDS)))

    async def keys(self) -> list[tuple[str, int]]:
        """(id, created_at_us) of every stored pattern: cheap, scalar only."""
        return [(str(r["id"]), int(r["created_at_us"])) for r in await self._run(lambda: self._all_keys(""))]

    def count_sync(self) -> int:
        res = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    async def count(self) -> int:
        return await self._run(self.count_sync)

    async def all_ids(self) -> list[str]:
        return [str(r["id"]) for r in await self._run(lambda: self._all_keys(""))]


def _records(rows: Sequence[Mapping[str, Any]]) -> list[PatternRecord]:
    """Rows to records, called in the worker thread: converting thousands of vectors' floats is milliseconds that
    the event loop should not spend."""
    return [PatternRecord.from_row(r) for r in rows]


def _is_connection_error(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("connect", "unavailable", "closed", "timeout", "deadline"))
