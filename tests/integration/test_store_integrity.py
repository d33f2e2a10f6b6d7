"""Pattern memory can be trusted: filters cannot be injected, any Unicode tag round-trips, a damaged or missing
store is never served as an empty healthy one, and a full disk refuses writes without taking reads down.

The quoting proof is property-based against milvus-lite's own filter tokenizer (milvus-lite 3.2.2 has no filter
templating: ``filter_params`` leave ``{name}`` in the expression and its parser rejects it). The damage tests
corrupt the milvus-lite files of a stopped orchestrator's data dir and start it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import orchestrator_args
from grym import Client, GrymError
from grym.v1 import orchestrator_pb2 as pb
from grym_synth.core.errors import InvalidArgument, NotFound, ResourceExhausted
from grym_synth.memory.store import PatternStore, PatternStoreDamaged
from grym_synth.inference.triton_process import EmbeddedTriton
from grym_synth.workflow.store import WorkflowRecord, WorkflowState, open_workflow_store
from support import OrchestratorProcess, tone

DIM = 4
INJECTIONS = [
    "x'] or not id in ['",  # the issue's payload: deleted every pattern through pymilvus' `id in [...]`
    'x"] or not id in ["',
    "x' or id != '",
    '" or 1==1 or "',
    "\\' or true or '\\",
    "%",
    "*",
]
NICE_VALUES = ["café", "naïve Ünïcödé", "日本語の音", "emoji 🎹🎶 👩‍🎤", 'say "hi"', "it's", "back\\slash", "\\",
               '\\"', "%_like%", "", " ", "\u2028 line sep", "x'] or not id in ['", "right-to-left \u202e"]
HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Any text a client could send except what tags refuse: control characters (Cc) and lone surrogates (Cs).
tag_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=60)


# --- milvus-lite has no filter templating (the quoting itself: tests/unit/test_store_filters.py) --------------------
def test_filter_templating_is_not_supported_by_milvus_lite(tmp_path: Path) -> None:
    """Why quote() exists: if this starts passing, switch the store to filter_params."""
    store = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    store.open()
    try:
        with pytest.raises(Exception, match="unexpected character"):
            store._client.query(store.collection, filter='tags["k"] == {v}', filter_params={"v": "x"},
                                output_fields=["id"])
    finally:
        store.close()


# --- the store itself ------------------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> Iterator[PatternStore]:
    s = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    s.open()
    yield s
    s.close()


async def test_unicode_tags_store_round_trip_and_filter(store: PatternStore) -> None:
    ids = {}
    for i, value in enumerate(NICE_VALUES):
        ids[value] = (await store.insert([1.0, 2.0, 3.0, float(i + 1)], duration_s=1.0, tags={"k": value, "n": str(i)},
                                         source=value)).id
    for value, pattern_id in ids.items():
        assert (await store.get(pattern_id)).tags["k"] == value
        listed, _ = await store.list(page_size=100, tag_filter={"k": value})
        assert [p.id for p in listed] == [pattern_id], value
        found = await store.search([1.0, 2.0, 3.0, 4.0], top_k=100, tag_filter={"k": value})
        assert [p.id for p in found] == [pattern_id], value
    assert await store.count() == len(NICE_VALUES)


@HYPOTHESIS
@given(value=tag_text)
def test_any_unicode_tag_value_filters_to_exactly_its_pattern(store: PatternStore, value: str) -> None:
    async def run() -> None:
        record = await store.insert([0.5, 1.0, 1.5, 2.0], duration_s=1.0, tags={"h": value}, source="h")
        try:
            listed, _ = await store.list(page_size=1000, tag_filter={"h": value})
            assert record.id in [p.id for p in listed] and all(p.tags["h"] == value for p in listed)
        finally:
            await store.delete(record.id)

    asyncio.run(run())


async def test_injected_ids_are_refused_and_touch_nothing(store: PatternStore) -> None:
    kept = [(await store.insert([1.0, 1.0, 1.0, float(i + 1)], duration_s=1.0, tags={"n": str(i)}, source="s")).id
            for i in range(3)]
    for payload in INJECTIONS + ["", "nope", kept[0].upper(), kept[0] + " ", kept[0] + "\n", "0" * 10_000]:
        for op in (store.get, store.delete):
            with pytest.raises(InvalidArgument):
                await op(payload)
        with pytest.raises(InvalidArgument):
            await store.search([1.0, 1.0, 1.0, 1.0], top_k=5, exclude_id=payload or "x")
        with pytest.raises(InvalidArgument):
            await store.get_many([kept[0], payload])
    with pytest.raises(NotFound):
        await store.delete(str(uuid.uuid4()))
    assert sorted(await store.all_ids()) == sorted(kept)
    hits = await store.search([1.0, 1.0, 1.0, 3.0], top_k=5, exclude_id=kept[2])
    assert kept[2] not in [h.id for h in hits] and len(hits) == 2


# --- damaged or missing stores: refuse to start, say why, lose nothing ----------------------------------------------
def _store_dir(data: Path) -> Path:
    return data / "milvus" / "patterns.db"


def _collection_dir(data: Path) -> Path:
    # (the music companion collection, memory/music_index.py, is not the patterns collection)
    from grym_synth.memory.music_index import is_music_collection

    dirs = [d for d in (_store_dir(data) / "collections").iterdir() if not is_music_collection(d.name)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _add_workflow_history(data: Path) -> None:
    wf = open_workflow_store(f"sqlite:///{data / 'workflows' / 'workflows.db'}")
    try:
        asyncio.run(wf.create(WorkflowRecord(
            id=str(uuid.uuid4()), request_text="calm piano", request_id="req-history", planner="rules",
            plan={"version": 1, "intent": "x", "steps": []}, state=WorkflowState.SUCCEEDED)))
    finally:
        wf.close()


def _start(data: Path, triton: EmbeddedTriton) -> OrchestratorProcess:
    return OrchestratorProcess(data, orchestrator_args(triton)).start(timeout_s=120)


def _refused(data: Path, triton: EmbeddedTriton, *says: str) -> str:
    orch = OrchestratorProcess(data, orchestrator_args(triton))
    with pytest.raises(RuntimeError, match="orchestrator exited"):
        orch.start(timeout_s=120)
    log = orch.log()
    assert "start-up failed" in log
    for fragment in says:
        assert fragment in log, (fragment, log[-3000:])
    return log


@pytest.fixture(scope="module")
def pristine(triton: EmbeddedTriton, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A stopped orchestrator's data dir: three stored patterns (flushed to parquet) and one workflow record."""
    data = tmp_path_factory.mktemp("pristine") / "data"
    orch = _start(data, triton)
    try:
        with Client(orch.target) as c:
            ids = [c.analyze(tone(0.6, seed=i), sample_rate_hz=16_000, store=True, tags={"n": str(i)}).pattern_id
                   for i in range(3)]
    finally:
        assert orch.stop() == 0
    _add_workflow_history(data)
    (data / "orchestrator.log").unlink()
    return data, ids


def _copy(pristine: tuple[Path, list[str]], tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(pristine[0], data)
    return data


def _patterns(orch: OrchestratorProcess) -> list[str]:
    with Client(orch.target) as c:
        return sorted(p.pattern_id for p in c.list_patterns())


def test_an_intact_store_with_history_starts(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                             tmp_path: Path) -> None:
    orch = _start(_copy(pristine, tmp_path), triton)
    try:
        assert _patterns(orch) == sorted(pristine[1])
        with Client(orch.target) as c:
            assert c.health("milvus") == "SERVING"
    finally:
        orch.stop()


def test_corrupt_manifest_is_refused_and_nothing_is_lost(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                                         tmp_path: Path) -> None:
    data = _copy(pristine, tmp_path)
    manifest = _collection_dir(data) / "manifest.json"
    good = manifest.read_bytes()
    assert json.loads(good)["partitions"]["_default"]["data_files"], "the fixture's patterns were flushed to parquet"
    manifest.write_bytes(good[: len(good) // 2])  # a torn write
    _refused(data, triton, "is damaged", "manifest.json is unreadable")
    # milvus-lite never opened it, so it deleted nothing: repairing the manifest brings every pattern back.
    manifest.write_bytes(good)
    orch = _start(data, triton)
    try:
        assert _patterns(orch) == sorted(pristine[1])
    finally:
        orch.stop()


def test_missing_manifest_is_refused(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                     tmp_path: Path) -> None:
    data = _copy(pristine, tmp_path)
    (_collection_dir(data) / "manifest.json").unlink()
    _refused(data, triton, "is damaged", "manifest.json is missing")


def test_stale_manifest_is_refused(pristine: tuple[Path, list[str]], triton: EmbeddedTriton, tmp_path: Path) -> None:
    """An older manifest (here: its backup copy, from before the flush) over newer data files."""
    data = _copy(pristine, tmp_path)
    coll = _collection_dir(data)
    prev = json.loads((coll / "manifest.json.prev").read_text())
    prev["partitions"] = {"_default": {"data_files": [], "delta_files": []}}
    (coll / "manifest.json").write_text(json.dumps(prev))
    _refused(data, triton, "is damaged", "newer than its manifest")


def test_missing_data_file_is_refused(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                      tmp_path: Path) -> None:
    data = _copy(pristine, tmp_path)
    for f in _collection_dir(data).glob("partitions/*/data/*.parquet"):
        f.unlink()
    _refused(data, triton, "is damaged", "are missing")


def test_garbage_data_file_is_refused(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                      tmp_path: Path) -> None:
    data = _copy(pristine, tmp_path)
    for f in _collection_dir(data).glob("partitions/*/data/*.parquet"):
        f.write_bytes(b"not parquet")
    _refused(data, triton, "cannot be opened", "damaged")


def test_missing_store_beside_workflow_history_is_refused(pristine: tuple[Path, list[str]], triton: EmbeddedTriton,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _copy(pristine, tmp_path)
    shutil.rmtree(data / "milvus")
    _refused(data, triton, "does not exist", "workflow history beside it has 1 record",
             "GRYM_ACCEPT_EMPTY_PATTERN_STORE")
    assert not (data / "milvus").exists(), "refusing created nothing"
    # The operator's way out, on purpose: an empty pattern memory.
    monkeypatch.setenv("GRYM_ACCEPT_EMPTY_PATTERN_STORE", "1")
    orch = _start(data, triton)
    try:
        assert _patterns(orch) == []
    finally:
        orch.stop()


def test_a_new_profile_beside_history_gets_its_collection(tmp_path: Path) -> None:
    """"Missing" means no pattern collection at all: another profile's collection beside the history is a first
    run of this profile (the data dir is shared between profiles), not a lost store."""
    uri = str(tmp_path / "milvus" / "patterns.db")
    tiny = PatternStore(uri, dim=DIM, model="wav2vec2", profile="tiny")
    tiny.open(lambda: 0)  # a fresh data dir: no history yet
    asyncio.run(tiny.insert([1.0, 2.0, 3.0, 4.0], duration_s=1.0, tags={}, source="s"))
    base = PatternStore(uri, dim=DIM, model="wav2vec2", profile="base")
    base.open(lambda: 3)
    try:
        assert asyncio.run(base.count()) == 0 and asyncio.run(tiny.count()) == 1
    finally:
        base.close()
        tiny.close()
    gone = PatternStore(str(tmp_path / "elsewhere" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    with pytest.raises(PatternStoreDamaged, match="does not exist, but the workflow history beside it has 3"):
        gone.open(lambda: 3)
    assert not (tmp_path / "elsewhere").exists()


# --- disk full: RESOURCE_EXHAUSTED naming the path, reads keep working, the breaker stays closed ---------------------
@pytest.fixture
def small_milvus_disk(tmp_path: Path) -> Iterator[Path]:
    """A data dir whose milvus-lite store lies on a 3 MB tmpfs (skipped where mounting is not permitted)."""
    data = tmp_path / "data"
    mount = data / "milvus"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    """Write zeros until the file system is full (unbuffered: nothing is left to fail at close)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def test_disk_full_refuses_writes_and_keeps_reads(small_milvus_disk: Path, triton: EmbeddedTriton) -> None:
    data = small_milvus_disk
    orch = OrchestratorProcess(data, orchestrator_args(triton, "--breaker-fail-max", "3")).start(timeout_s=120)
    try:
        with Client(orch.target, timeout_s=30) as c:
            kept = c.analyze(tone(0.6), sample_rate_hz=16_000, store=True, tags={"disk": "ok"})
            filler = _fill(data / "milvus")
            # The WAL's last page may still have room for a few small rows: write until the disk refuses.
            stored = [kept.pattern_id]
            for i in range(200):
                try:
                    stored.append(c.analyze(tone(0.6, seed=i + 1), sample_rate_hz=16_000, store=True,
                                            tags={"disk": "ok"}).pattern_id)
                except GrymError as first:
                    assert first.code == grpc.StatusCode.RESOURCE_EXHAUSTED, first
                    break
            else:
                pytest.fail("the pattern store never reported the full disk")
            for i in range(6):  # twice the breaker's threshold
                with pytest.raises(GrymError) as err:
                    c.analyze(tone(0.6, seed=i + 1), sample_rate_hz=16_000, store=True, tags={"disk": "full"})
                assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
                assert str(data / "milvus") in str(err.value) and "disk is full" in str(err.value)
            # Reads keep working: the breaker that guards them did not open.
            assert c.get_pattern(kept.pattern_id).tags == {"disk": "ok"}
            assert sorted(p.pattern_id for p in c.list_patterns(page_size=1000)) == sorted(stored)
            assert c.search(embedding=kept.embedding.tolist(), top_k=1)[0].pattern.pattern_id == kept.pattern_id
            assert c.health("milvus") == "SERVING"
            # Space again: writes work again, without a restart.
            filler.unlink()
            deadline = time.monotonic() + 30
            while True:
                try:
                    again = c.analyze(tone(0.6, seed=9), sample_rate_hz=16_000, store=True, tags={"disk": "again"})
                    break
                except GrymError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            assert c.get_pattern(again.pattern_id).tags == {"disk": "again"}
    finally:
        orch.stop()


async def test_disk_full_is_resource_exhausted_and_not_a_breaker_failure(tmp_path: Path) -> None:
    """The same at store level, with the write failing the way milvus-lite reports it."""
    store = PatternStore(str(tmp_path / "milvus" / "patterns.db"), dim=DIM, model="wav2vec2", profile="tiny")
    store.open()
    try:
        real = store._client

        class Full:
            def __getattr__(self, name: str) -> object:
                return getattr(real, name)

            def insert(self, *a: object, **k: object) -> None:
                exc = RuntimeError("<MilvusException: (code=1, message=[Errno 28] No space left on device)>")
                raise exc from exc  # as pymilvus does: a cause cycle

        store._client = Full()
        for _ in range(10):
            with pytest.raises(ResourceExhausted, match="disk is full"):
                await store.insert([1.0, 2.0, 3.0, 4.0], duration_s=1.0, tags={}, source="s")
        assert store.breaker.state == "closed"
        assert await store.count() == 0
    finally:
        store._client = real
        store.close()


def test_pattern_ids_in_status_messages_are_bounded(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.GetPattern(pb.GetPatternRequest(pattern_id="x" * 100_000), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details()) < 400 and "a UUID" in err.value.details()
