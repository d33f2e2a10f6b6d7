"""Pattern memory: audio embeddings and their provenance in Milvus.

One collection per (model, profile): embeddings of different models or sizes live in different spaces and have
different dimensions, so mixing them would make similarity meaningless. The same code talks to a milvus-lite file
(the default) or a Milvus server/cluster (``--milvus-uri http://host:19530``).

pymilvus is synchronous; every call runs in a worker thread so the event loop keeps serving. Searches ask only
for the scalar fields they return: fetching vectors made a milvus-lite search ~60x slower.

A store may own a :class:`~grym_synth.memory.recall_index.RecallIndex` (the orchestrator's does): text recall then reads
memory instead of Milvus, and the store keeps it current by telling it about every insert and delete once Milvus
has accepted it. The store is the one place that writes patterns, so this is the one place that can.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import logging
import os
import re
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from grym_synth.core.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from grym_synth.core.resilience import AsyncBreaker
from grym_synth.memory.music_index import (MUSIC_SCALARS, MUSIC_SUFFIX, MusicFields, MusicQuery,
                                           create_music_collection, descriptors_only, is_music_collection,
                                           text_rank)

if TYPE_CHECKING:
    from grym_synth.memory.audio_store import AudioStore
    from grym_synth.memory.recall_index import RecallIndex

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # always fullmatch: "$" would accept a trailing newline
# The format every pattern id is issued in (str(uuid.uuid4())). Ids are checked against it before they reach Milvus:
# pymilvus splices ids into an ``id in [...]`` expression, so an unchecked id is filter code.
PATTERN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_TAGS = 32
MAX_TAG_VALUE = 256
MAX_META_BYTES = 16_384
MAX_TOP_K = 100
DEFAULT_TOP_K = 10  # SearchPatterns' top_k when the request leaves it 0
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 50  # ListPatterns' page_size when the request leaves it 0
MUSIC_MOVE_BATCH = 1000  # rows per upsert when moving descriptors to a new embedding layout
# Set to 1 to open an empty pattern store beside a non-empty workflow history on purpose (e.g. after deleting it).
ACCEPT_EMPTY_ENV = "GRYM_ACCEPT_EMPTY_PATTERN_STORE"
SCALAR_FIELDS = ["id", "model", "profile", "duration_s", "tags", "created_at_us", "source", "metadata"]


class PatternStoreError(RuntimeError):
    """The pattern store cannot be served as configured (the server refuses to start, saying why)."""


class PatternStoreDamaged(PatternStoreError):
    """The pattern store is damaged or missing; serving it would present lost patterns as an empty store."""


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
    music: MusicFields | None = None  # the music descriptors (and trained embedding when asked); None: never analysed

    @property
    def audio_sha256(self) -> str:
        """SHA-256 of the pattern's stored audio ("" without), from the reserved metadata key (audio_store.py)."""
        from grym_synth.memory.audio_store import AUDIO_SHA_KEY

        return str(self.metadata.get(AUDIO_SHA_KEY, ""))

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


def _show(value: object, limit: int = 40) -> str:
    """A client's value, bounded, for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def check_pattern_id(pattern_id: object, what: str = "pattern_id") -> str:
    """The id if it has the issued format (a lowercase UUID); INVALID_ARGUMENT otherwise."""
    if not pattern_id:
        raise InvalidArgument(f"{what} is required")
    if not isinstance(pattern_id, str) or not PATTERN_ID.fullmatch(pattern_id):
        raise InvalidArgument(f"{what} must be a pattern id as returned by AnalyzeAudio, Generate or ListPatterns "
                              f"(a UUID such as 7c9e6679-7425-40de-944b-e07fc1f90ae7), got {_show(pattern_id)}")
    return pattern_id


def _control_char(text: str) -> str | None:
    """The first control character (Unicode Cc: NUL, C0, DEL, C1) or lone surrogate in ``text``, if any."""
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return ch
    return None


def validate_tags(tags: Mapping[str, str], what: str = "tags") -> dict[str, str]:
    """The one check for tags, the same when storing and when filtering, so a stored tag can always be filtered:
    keys are 1-64 characters of a safe alphabet, values any Unicode text of at most 256 characters without control
    characters (they are refused, not stripped, so that a value round-trips exactly)."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{what} has {len(tags)} entries; at most {MAX_TAGS} are allowed")
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.fullmatch(key):
            raise InvalidArgument(f"{what} key {_show(key)} must be 1-64 characters of letters, digits, '_', '.', "
                                  "'-'")
        if not isinstance(value, str):
            raise InvalidArgument(f"{what}[{key}] must be a string")
        if len(value) > MAX_TAG_VALUE:
            raise InvalidArgument(f"{what}[{key}] is {len(value)} characters; at most {MAX_TAG_VALUE} are allowed")
        bad = _control_char(value)
        if bad is not None:
            raise InvalidArgument(f"{what}[{key}] contains the control character U+{ord(bad):04X}; tag values may "
                                  "hold any other Unicode text")
    return dict(tags)


# Milvus string literals (milvus-lite 3.x: milvus_lite/search/filter/tokens.py::_read_string; Milvus server:
# Plan.g4's StringLiteral) end at the opening quote character, treat backslash as an escape, and reject a raw CR or
# LF; every other character stands for itself. These are the only characters that need escaping.
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def quote(value: str) -> str:
    """``value`` as a double-quoted Milvus string literal that parses back to exactly ``value``.

    milvus-lite 3.2.2 has no filter templating (``filter_params`` leaves ``{name}`` in the expression, which its
    parser rejects), so user text goes into filters only through this function. Unicode stays as it is (JSON's
    ``\\uXXXX`` escapes are not understood by milvus-lite: that made ``café`` an INTERNAL error); control characters
    other than tab/CR/LF are refused (callers validate before: this is the last line)."""
    if not isinstance(value, str):
        raise TypeError(f"quote() takes a str, got {type(value).__name__}")
    out = []
    for ch in value:
        esc = _LITERAL_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif unicodedata.category(ch) in ("Cc", "Cs"):
            raise InvalidArgument(f"a filter value contains the control character U+{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def tag_filter_expr(tags: Mapping[str, str]) -> str:
    """A Milvus boolean expression matching all tags. Keys are from the safe alphabet and values are quoted with
    :func:`quote` (the same validation as at store time: whatever can be stored can be filtered)."""
    validate_tags(tags, "tag_filter")
    return " and ".join(f"tags[{quote(k)}] == {quote(v)}" for k, v in sorted(tags.items()))


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
                 recall_index: RecallIndex | None = None, audio_store: AudioStore | None = None,
                 music_dim: int = 0) -> None:
        self.uri = uri
        # The trained tagger's embedding size; 0: no music models, no companion collection (memory/music_index.py).
        self.music_dim = music_dim
        self.token = token
        self.dim = dim
        self.model = model
        self.profile = profile
        self.collection_prefix = collection_prefix.replace("-", "_")
        self.collection = f"{collection_prefix}_{model}_{profile}".replace("-", "_")
        self._client: Any = None
        self._lock = threading.Lock()  # milvus-lite's local engine is not safe for concurrent writers
        self.ready = False
        # Trips on Milvus failures (not on bad requests), so an outage answers UNAVAILABLE at once. A full disk is
        # no outage (reads still work): it is raised as ResourceExhausted, which no breaker counts
        # (grym_synth.core.resilience.NOT_DOWNSTREAM_FAULTS), so a failed write cannot open the breaker that guards reads.
        self.breaker = breaker or AsyncBreaker("milvus", exclude=[InvalidArgument, NotFound, ResourceExhausted])
        # Text recall's in-memory view of this store (None: recall queries Milvus); loaded and reconciled by
        # RecallIndex.keep_in_sync, told about this store's writes below.
        self.recall_index = recall_index
        # Where patterns' audio is kept (None: patterns are stored without audio); see memory/audio_store.py.
        self.audio_store = audio_store

    @property
    def music_collection(self) -> str:
        """The companion collection, named by its embedding's size so that a new embedding gets a new collection
        (:meth:`_move_legacy_music` moves the descriptors of the previous one over)."""
        return f"{self.collection}{MUSIC_SUFFIX}{self.music_dim}"

    @property
    def legacy_music_collection(self) -> str:
        """The companion collection of the 200-d layout (musicnn's penultimate layer), named without a size."""
        return self.collection + MUSIC_SUFFIX

    # --- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def is_local(self) -> bool:
        """A milvus-lite directory on this host (else a Milvus server URI)."""
        return "://" not in self.uri

    def open(self, history: Callable[[], int] | None = None) -> None:
        """Connect, create the collection on first use, and load it (a reopened collection must be loaded).

        ``history`` counts the workflow records kept beside this store. A store that is damaged, or missing while
        that history is not empty, is never opened as an empty one: :class:`PatternStoreDamaged` says why (the
        server then refuses to start). "Missing" means no pattern collection at all: a store that has another
        model's or profile's collection but not this one's is a first run of this profile, and gets its collection.
        A local store's files are checked *before* milvus-lite opens them, because its recovery deletes data files
        that its manifest does not list: opening a store whose manifest is damaged would turn the damage into loss."""
        from pymilvus import MilvusClient

        if self.is_local:
            self._check_local_files(history)
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(self.uri, token=self.token or "")
            exists = self._client.has_collection(self.collection)
            if not exists:
                if not self.is_local:  # (a local store was checked before it was opened)
                    others = [c for c in self._client.list_collections()
                              if c.startswith(self.collection_prefix) and not is_music_collection(c)]
                    self._refuse_if_missing(history, bool(others), f"Milvus has no {self.collection_prefix}_* "
                                                                   "collection")
                self._create_collection()
            else:
                self._check_dimension()
            self._client.load_collection(self.collection)
            self._open_music()
            count = self.count_sync()
        except (PatternStoreError, InvalidArgument):
            raise
        except Exception as exc:
            if not self.is_local and _is_connection_error(exc):
                raise
            raise PatternStoreDamaged(f"the pattern store at {self.uri} cannot be opened ({exc}); it is damaged. "
                                      "Restore it from a backup") from exc
        self.ready = True
        log.info("pattern store %s ready at %s (%d patterns)", self.collection, self.uri, count)

    def _refuse_if_missing(self, history: Callable[[], int] | None, has_others: bool, what: str) -> None:
        """A store without any pattern collection beside a non-empty workflow history was lost, not never made."""
        if has_others or os.environ.get(ACCEPT_EMPTY_ENV) == "1":
            return
        workflows = history() if history is not None else 0
        if workflows:
            raise PatternStoreDamaged(
                f"{what}, but the workflow history beside it has {workflows} record(s): the store is missing or "
                f"damaged. Restore it from a backup; to start with an empty pattern memory on purpose, set "
                f"{ACCEPT_EMPTY_ENV}=1")

    def _check_local_files(self, history: Callable[[], int] | None) -> None:
        """Refuse a milvus-lite store whose files milvus-lite would silently serve as fewer (or no) patterns."""
        root = Path(self.uri)
        coll = root / "collections" / self.collection
        if not coll.exists():
            # (a music companion collection alone does not make a store: its patterns are gone)
            others = [d for d in (root / "collections").glob(f"{self.collection_prefix}_*")
                      if d.is_dir() and not is_music_collection(d.name)]
            self._refuse_if_missing(history, bool(others), f"the pattern store {root} "
                                    f"{'does not exist' if not root.exists() else 'holds no pattern collection'}")
            return
        problems = self._local_problems(coll)
        for name in (self.music_collection, self.legacy_music_collection):
            music = root / "collections" / name
            if self.music_dim and music.exists():  # the descriptors are checked like the patterns
                problems += self._local_problems(music)
        if problems:
            raise PatternStoreDamaged(f"the pattern store {root} is damaged: {'; '.join(problems)}. It was not opened "
                                      "(milvus-lite would serve it as fewer patterns and delete the data files its "
                                      "manifest no longer lists); restore it from a backup")

    @staticmethod
    def _local_problems(coll: Path) -> list[str]:
        """What is wrong with one milvus-lite collection directory's files (empty: nothing)."""
        problems: list[str] = []
        manifest = coll / "manifest.json"
        data: Any = None
        try:
            data = json.loads(manifest.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            problems.append(f"{manifest} is missing")
        except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            problems.append(f"{manifest} is unreadable ({type(exc).__name__}: {exc})")
        try:
            if not isinstance(json.loads((coll / "schema.json").read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            problems.append(f"{coll / 'schema.json'} is unreadable ({type(exc).__name__})")
        if isinstance(data, dict):
            listed = _manifest_files(coll, data)
            missing = [str(f) for f in listed if not f.exists()]
            if missing:
                problems.append(f"{len(missing)} data file(s) its manifest lists are missing: {', '.join(missing[:3])}")
            # Files left over by an interrupted compaction hold rows the manifest already has (sequence numbers up
            # to its current_seq); a file with newer rows than the manifest knows means the manifest is stale.
            current = data.get("current_seq")
            known = set(listed)
            newer = [str(f) for f in sorted(coll.glob("partitions/*/*/*.parquet"))
                     if f not in known and isinstance(current, int) and (_max_seq(f) or 0) > current]
            if newer:
                problems.append(f"{len(newer)} data file(s) hold rows newer than its manifest: {', '.join(newer[:3])}")
        return problems

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

    def _check_dimension(self, collection: str | None = None, expected: int | None = None) -> None:
        collection, expected = collection or self.collection, expected or self.dim
        desc = self._client.describe_collection(collection)
        for f in desc.get("fields", []):
            if f.get("name") == "embedding":
                dim = int(f.get("params", {}).get("dim", expected))
                if dim != expected:
                    raise PatternStoreError(
                        f"collection {collection} holds {dim}-dimensional embeddings but the served model "
                        f"produces {expected}; use another --collection-prefix or data dir"
                    )

    def _open_music(self) -> None:
        """The companion collection of music descriptors (created beside an existing store: the patterns
        collection is never touched), with the descriptors of the previous layout moved in."""
        if not self.music_dim:
            return
        if not self._client.has_collection(self.music_collection):
            create_music_collection(self._client, self.music_collection, self.music_dim)
        else:
            self._check_dimension(self.music_collection, self.music_dim)
        self._client.load_collection(self.music_collection)
        self._move_legacy_music()

    def _move_legacy_music(self) -> None:
        """Stores written before the timbre embedding keep their descriptors in ``<patterns>_music`` beside a
        200-d embedding from another layer, which means nothing in the new space. Every row's tempo, key, tags and
        summary are upserted here without that embedding (such patterns are still found by their descriptors and
        in the Wav2Vec2 space, not by "sounds similar"), and only then is the old collection dropped. A crash in
        between repeats the upsert on the next start: nothing is lost."""
        legacy = self.legacy_music_collection
        if legacy == self.music_collection or not self._client.has_collection(legacy):
            return
        self._client.load_collection(legacy)
        rows = self._iterate_in(legacy, 'id != ""', MUSIC_SCALARS)
        for start in range(0, len(rows), MUSIC_MOVE_BATCH):
            batch = [descriptors_only(r, self.music_dim) for r in rows[start:start + MUSIC_MOVE_BATCH]]
            self._client.upsert(self.music_collection, batch)
        self._client.drop_collection(legacy)
        log.info("moved the music descriptors of %d patterns from %s to %s (their embeddings were another "
                 "model layer's and are not kept)", len(rows), legacy, self.music_collection)

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
                if _is_disk_full(exc):
                    where = Path(self.uri).parent if self.is_local else "the Milvus server"
                    log.error("pattern store write failed, disk full at %s: %s", where, exc)
                    raise ResourceExhausted(f"the pattern store's disk is full ({where}); the pattern was not "
                                            "stored; reads keep working") from exc
                if _is_connection_error(exc):
                    log.warning("milvus call failed: %s", exc)  # the detail (addresses included) stays here
                    raise Unavailable("milvus", "the pattern store cannot be reached; retry shortly") from exc
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
                     metadata: Mapping[str, str] | None = None, audio: np.ndarray | None = None,
                     music: MusicFields | None = None) -> PatternRecord:
        """Store a pattern; with ``audio`` (16 kHz mono samples) and an audio store, its audio too: the file is
        written first and named in the metadata, so a stored pattern never references audio that is not there, and
        a failed insert removes the file again unless another pattern uses it."""
        from grym_synth.memory.audio_store import AUDIO_SHA_KEY

        meta = {k: v for k, v in (metadata or {}).items() if k != AUDIO_SHA_KEY}  # the key is the server's alone
        if audio is None or self.audio_store is None:
            return await self._insert(embedding, duration_s=duration_s, tags=tags, source=source, meta=meta,
                                      music=music)
        self.check_vector(embedding)
        validate_tags(tags)
        async with self.audio_store.lock:
            meta[AUDIO_SHA_KEY] = await self.audio_store.put(audio)
            try:
                return await self._insert(embedding, duration_s=duration_s, tags=tags, source=source, meta=meta,
                                          music=music)
            except BaseException:
                await asyncio.shield(self._collect_audio(meta[AUDIO_SHA_KEY]))
                raise

    async def _insert(self, embedding: Sequence[float], *, duration_s: float, tags: Mapping[str, str], source: str,
                      meta: dict[str, str], music: MusicFields | None = None) -> PatternRecord:
        vector = self.check_vector(embedding)
        tags = validate_tags(tags)
        if len(json.dumps(meta)) > MAX_META_BYTES:
            raise InvalidArgument(f"pattern metadata exceeds {MAX_META_BYTES} bytes")
        record = PatternRecord(
            id=str(uuid.uuid4()), model=self.model, profile=self.profile, duration_s=float(duration_s), tags=tags,
            created_at_us=time.time_ns() // 1000, source=_clip_utf8(source, 256), metadata=meta,
        )
        row = {**{k: getattr(record, k) for k in ("id", "model", "profile", "duration_s", "tags", "created_at_us",
                                                   "source", "metadata")}, "embedding": vector}
        with_music = music is not None and self.music_dim > 0
        if with_music:  # the descriptors first: a pattern row exists only with them (memory/music_index.py)
            await self._run(lambda: self._client.insert(self.music_collection,
                                                        [music.row(record.id, self.music_dim)]))  # type: ignore
        try:
            await self._run(lambda: self._client.insert(self.collection, [row]))
        except BaseException:
            if with_music:
                await self._drop_orphan_music(record.id)
            raise
        record.music = music if with_music else None
        if self.recall_index is not None:
            self.recall_index.add(record)
        return record

    async def get(self, pattern_id: str, *, include_embedding: bool = False) -> PatternRecord:
        check_pattern_id(pattern_id)
        fields = SCALAR_FIELDS + (["embedding"] if include_embedding else [])
        rows = await self._run(lambda: self._client.get(self.collection, ids=[pattern_id], output_fields=fields))
        if not rows:
            raise NotFound(f"pattern {pattern_id!r} does not exist")
        record = PatternRecord.from_row(rows[0])
        await self.attach_music([record], include_embedding=include_embedding)
        return record

    async def delete(self, pattern_id: str) -> None:
        """Delete a pattern, and its audio file when no other pattern references it (GC by reference query)."""
        check_pattern_id(pattern_id)

        def op() -> PatternRecord | None:
            rows = self._client.get(self.collection, ids=[pattern_id], output_fields=["id", "metadata"])
            if not rows:
                return None
            self._client.delete(self.collection, ids=[pattern_id])
            if self.music_dim:
                self._client.delete(self.music_collection, ids=[pattern_id])
            return PatternRecord.from_row(rows[0])

        if self.audio_store is None:
            deleted = await self._run(op)
        else:
            async with self.audio_store.lock:
                deleted = await self._run(op)
                if deleted is not None and deleted.audio_sha256:
                    await self._collect_audio(deleted.audio_sha256)
        if deleted is None:
            raise NotFound(f"pattern {pattern_id!r} does not exist")
        if self.recall_index is not None:
            self.recall_index.remove(pattern_id)

    async def _collect_audio(self, sha: str) -> None:
        """Remove the audio file ``sha`` unless a stored pattern still references it (call under the audio lock).
        A failure only leaves an unreferenced file behind (logged), never a pattern without its audio."""
        from grym_synth.memory.audio_store import AUDIO_SHA_KEY, is_sha256

        if self.audio_store is None or not is_sha256(sha):
            return
        try:
            expr = f"metadata[{quote(AUDIO_SHA_KEY)}] == {quote(sha)}"
            if not await self._run(lambda: self._client.query(self.collection, filter=expr, output_fields=["id"],
                                                              limit=1)):
                await self.audio_store.delete(sha)
        except Exception:  # a leftover file is harmless; a failed delete must not fail the pattern's deletion
            log.warning("could not collect the audio file %s", sha, exc_info=True)

    async def audio(self, pattern_id: str) -> tuple[PatternRecord, bytes]:
        """(the pattern, its stored WAV bytes); NOT_FOUND when it has none, DATA_LOSS when the file is lost."""
        record = await self.get(pattern_id)
        if not record.audio_sha256 or self.audio_store is None:
            raise NotFound(f"pattern {pattern_id} has no stored audio (it was stored without audio, e.g. before "
                           "audio storage was enabled); GetPatternAudio, VARY and CONTINUE need a pattern with audio")
        return record, await self.audio_store.get(record.audio_sha256, pattern_id=pattern_id)

    async def search(self, vector: Sequence[float], *, top_k: int, tag_filter: Mapping[str, str] | None = None,
                     exclude_id: str | None = None, include_embedding: bool = False,
                     music: MusicQuery | None = None) -> list[PatternRecord]:
        """Nearest patterns in the Wav2Vec2 space; ``music`` restricts them to patterns whose descriptors pass."""
        vec = self.check_vector(vector)
        clauses = _query_clauses(top_k, exclude_id) + ([tag_filter_expr(tag_filter)] if tag_filter else [])
        if music:
            ids = await self._music_ids(music.expr())
            if not ids:
                return []
            clauses.append(_id_in(ids))
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
                p.music = full[p.id].music if p.id in full else None
        else:
            await self.attach_music(found)
        return found

    # --- music (the companion collection; see memory/music_index.py) ------------------------------------------------
    def check_music_vector(self, vector: Sequence[float], what: str = "embedding") -> list[float]:
        if not self.music_dim:
            raise InvalidArgument("the music space is not available: the server runs without the music models")
        if len(vector) != self.music_dim:
            raise InvalidArgument(f"{what} has {len(vector)} dimensions; the music space uses {self.music_dim}")
        arr = np.asarray(vector, dtype=np.float32)
        if not np.isfinite(arr).all() or not np.any(arr):
            raise InvalidArgument(f"{what} contains NaN or infinite values, or is all zeros")
        return arr.tolist()

    async def _drop_orphan_music(self, pattern_id: str) -> None:
        """Remove the descriptors of a pattern whose own row was not written. Best effort: an orphan that stays
        (the disk is full) is never shown, because every music query maps its ids through the patterns
        collection."""
        try:
            await self._run(lambda: self._client.delete(self.music_collection, ids=[pattern_id]))
        except Exception as exc:
            log.warning("descriptors of the unwritten pattern %s stay behind (harmless): %s", pattern_id, exc)

    async def attach_music(self, records: Sequence[PatternRecord], *, include_embedding: bool = False) -> None:
        if not self.music_dim or not records:
            return
        fields = MUSIC_SCALARS + (["embedding"] if include_embedding else [])
        ids = [r.id for r in records]
        rows = await self._run(lambda: self._client.get(self.music_collection, ids=ids, output_fields=fields))
        by_id = {str(r["id"]): MusicFields.from_row(r) for r in rows}
        for r in records:
            r.music = by_id.get(r.id)

    async def _music_ids(self, expr: str) -> list[str]:
        if not self.music_dim:
            return []
        return [str(r["id"]) for r in await self._run(lambda: self._iterate_in(self.music_collection, expr, ["id"]))]

    async def search_music(self, vector: Sequence[float], *, top_k: int, tag_filter: Mapping[str, str] | None = None,
                           exclude_id: str | None = None, include_embedding: bool = False,
                           music: MusicQuery | None = None) -> list[PatternRecord]:
        """Nearest patterns by the trained tagger's embedding ("sounds similar")."""
        vec = self.check_music_vector(vector)
        clauses = _query_clauses(top_k, exclude_id) + ["has_embedding == true"] + ([music.expr()] if music else [])
        if tag_filter:
            expr = tag_filter_expr(tag_filter)
            ids = [str(r["id"]) for r in await self._run(lambda: self._iterate(expr, ["id"]))]
            if not ids:
                return []
            clauses.append(_id_in(ids))
        expr = " and ".join(c for c in clauses if c)
        rows = await self._run(lambda: self._client.search(
            self.music_collection, data=[vec], limit=top_k, filter=expr, output_fields=["id"],
            search_params={"metric_type": "COSINE"}))
        hits = [(str(r.get("entity", r)["id"]), float(r["distance"])) for r in (rows[0] if rows else [])]
        return await self._ranked([(i, d) for i, d in hits], include_embedding)

    async def search_text(self, labels: Sequence[str], *, top_k: int, tag_filter: Mapping[str, str] | None = None,
                          music: MusicQuery | None = None, include_embedding: bool = False) -> list[PatternRecord]:
        """Patterns whose top tags name any of ``labels``, ranked by how many of the labels they name, then by the
        mean tagger score of the labels (the match's score, in [0, 1]): :func:`text_rank`."""
        _check_top_k(top_k)
        if not self.music_dim:
            raise InvalidArgument("text search needs the music models, which this server does not run")
        any_label = f"array_contains_any(music_tags, [{', '.join(quote(lb) for lb in labels)}])"
        expr = " and ".join([any_label] + ([music.expr()] if music else []))
        rows = await self._run(lambda: self._iterate_in(self.music_collection, expr, MUSIC_SCALARS))
        ranked = sorted(((text_rank(MusicFields.from_row(r), labels), str(r["id"])) for r in rows),
                        key=lambda x: (-x[0][0], -x[0][1], x[1]))
        if tag_filter:
            expr = tag_filter_expr(tag_filter)
            allowed = {str(r["id"]) for r in await self._run(lambda: self._iterate(expr, ["id"]))}
            ranked = [x for x in ranked if x[1] in allowed]
        return await self._ranked([(i, score) for (_, score), i in ranked[:top_k]], include_embedding)

    async def _ranked(self, hits: Sequence[tuple[str, float]], include_embedding: bool) -> list[PatternRecord]:
        """Records in ``hits`` order with their scores (ids the patterns collection no longer has are dropped)."""
        if not hits:
            return []
        records = {p.id: p for p in await self.get_many([i for i, _ in hits], include_embedding=include_embedding)}
        await self.attach_music(list(records.values()), include_embedding=include_embedding)
        out = []
        for pattern_id, score in hits:
            if pattern_id in records:
                records[pattern_id].score = score
                out.append(records[pattern_id])
        return out

    def _iterate_in(self, collection: str, expr: str, fields: list[str]) -> list[dict[str, Any]]:
        it = self._client.query_iterator(collection, batch_size=4096, filter=expr, output_fields=fields)
        out: list[dict[str, Any]] = []
        try:
            while batch := it.next():
                out.extend(batch)
        finally:
            it.close()
        return out

    async def get_many(self, ids: Sequence[str], *, include_embedding: bool = False) -> list[PatternRecord]:
        if not ids:
            return []
        for pattern_id in ids:
            check_pattern_id(pattern_id)
        fields = SCALAR_FIELDS + (["embedding"] if include_embedding else [])
        return await self._run(lambda: _records(self._client.get(self.collection, ids=list(ids),
                                                                 output_fields=fields)))

    async def list(self, *, page_size: int, page_token: str = "", tag_filter: Mapping[str, str] | None = None,
                   music: MusicQuery | None = None) -> tuple[list[PatternRecord], str]:
        """Newest first. Milvus has no ORDER BY, so ids and timestamps of the matching rows are sorted here;
        that is O(matching rows) of two scalar columns per page, fine for a single host's pattern memory."""
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        expr = tag_filter_expr(tag_filter) if tag_filter else ""
        if music:
            expr = " and ".join(filter(None, [expr, f"music:{music.expr()}"]))  # the token's filter identity
        offset = _decode_page_token(page_token, expr) if page_token else 0
        main_expr = tag_filter_expr(tag_filter) if tag_filter else ""
        if music:
            ids = await self._music_ids(music.expr())
            if not ids:
                return [], ""
            main_expr = " and ".join(filter(None, [main_expr, _id_in(ids)]))
        keys = await self._run(lambda: self._all_keys(main_expr))
        keys.sort(key=lambda r: (-int(r["created_at_us"]), str(r["id"])))
        page_ids = [str(r["id"]) for r in keys[offset: offset + page_size]]
        records = {p.id: p for p in await self.get_many(page_ids)}
        page = [records[i] for i in page_ids if i in records]
        await self.attach_music(page)
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


def _check_top_k(top_k: int) -> None:
    if not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be 1..{MAX_TOP_K}, got {top_k}")


def _query_clauses(top_k: int, exclude_id: str | None) -> list[str]:
    """The filter clauses every similarity search starts with (INVALID_ARGUMENT for a bad top_k or exclude_id)."""
    _check_top_k(top_k)
    return [f"id != {quote(check_pattern_id(exclude_id, 'exclude_id'))}"] if exclude_id else []


def _id_in(ids: Sequence[str]) -> str:
    """``id in [...]`` over ids this store issued, each checked and quoted."""
    return f"id in [{', '.join(quote(check_pattern_id(i, 'id')) for i in ids)}]"


def _records(rows: Sequence[Mapping[str, Any]]) -> list[PatternRecord]:
    """Rows to records, called in the worker thread: converting thousands of vectors' floats is milliseconds that
    the event loop should not spend."""
    return [PatternRecord.from_row(r) for r in rows]


def _manifest_files(coll: Path, manifest: Mapping[str, Any]) -> list[Path]:
    """The data and delta files a milvus-lite manifest lists (paths relative to the partition directory)."""
    out: list[Path] = []
    partitions = manifest.get("partitions")
    if not isinstance(partitions, Mapping):
        return out
    for name, entry in partitions.items():
        if not isinstance(entry, Mapping):
            continue
        for key in ("data_files", "delta_files"):
            files = entry.get(key) or []
            if isinstance(files, list):
                out.extend(coll / "partitions" / str(name) / str(f) for f in files if isinstance(f, str))
    return out


def _max_seq(path: Path) -> int | None:
    """The last sequence number in a milvus-lite data/delta file name (``data_000001_000005.parquet`` -> 5)."""
    m = re.fullmatch(r"(?:data|delta)_\d+_(\d+)\.parquet", path.name)
    return int(m.group(1)) if m else None


def _clip_utf8(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text`` (VARCHAR lengths are bytes in Milvus), cut between characters."""
    return text.encode("utf-8", "surrogatepass")[:limit].decode("utf-8", "ignore")


def _is_disk_full(exc: Exception) -> bool:
    """ENOSPC/EDQUOT in this process (milvus-lite) or Milvus's own disk quota, however pymilvus wraps it."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and all(link is not c for c in chain):  # pymilvus raises `e from e`: a cycle
        chain.append(link)
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        link = link.__cause__ or link.__context__
    text = str(exc).lower()
    return any(s in text for s in ("no space left on device", "errno 28]", "disk quota exceeded", "errno 122]",
                                   "diskquotaexceeded"))


def _is_connection_error(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("connect", "unavailable", "closed", "timeout", "deadline"))
