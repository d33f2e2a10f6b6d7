"""Every RPC of grym.v1.Orchestrator, driven with adversarial values over the real server (issue 11, "Trust").

Property-based (hypothesis; bounded, derandomized, no example database, so CI runs the same examples every time):
quotes, backslashes, filter syntax, Unicode, NUL and other control characters, very long strings; huge, negative,
NaN, infinite and tiny numbers; unknown enum values; bytes that are not a protobuf message. For every call:

* the status is one the RPC may answer for bad input (never INTERNAL or UNKNOWN, never UNAVAILABLE: the service
  was healthy, so UNAVAILABLE could only be caused by the input);
* reads, and deletes of ids that do not exist, leave the stored patterns (ids, tags, a checksum of the scalar
  fields and of the vector) and the workflow records exactly as they were;
* a write that is accepted stores exactly what was sent (tags round-trip) and is then removed again.

The requests are built with the generated stubs, not the ``grym`` client, so that every field can be set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from grym.v1 import common_pb2, orchestrator_pb2 as pb, orchestrator_pb2_grpc as pb_grpc
from support import OrchestratorProcess, tone

C = grpc.StatusCode
NEVER = {C.INTERNAL, C.UNKNOWN, C.UNAVAILABLE}
DIM = 32  # the tiny profile's embedding size

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
CHEAP = settings(PROPERTY, max_examples=25)

# --- adversarial values -----------------------------------------------------------------------------------------------
INJECTIONS = [
    "x'] or not id in ['",  # issue 11: DeletePattern deleted every pattern, GetPattern returned another one
    'x"] or not id in ["',
    "x' or id != '",
    '" or 1==1 or "',
    "\\' or true or '\\",
    "' OR '1'='1",
    "1; DROP TABLE workflows; --",
    '{v}',
    "%",
    "*",
]
NASTY_TEXT = INJECTIONS + [
    "", " ", "\x00", "a\x00b", "\x01\x02\x1b[31m\x7f", "\x85\u2028\u2029", "\t\n\r", "café", "🎹🎶 👩‍🎤", "\u202e",
    "\\", '"', "'", "\\\\\\", "../../etc/passwd", "${jndi:ldap://x}", "null", "undefined", "\ufeff", "\uffff",
    "x" * 300, "é" * 5000, "x" * 100_000,
]
text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(st.characters(exclude_categories=("Cs",)), max_size=40))
# Text a tag value may hold: anything but control characters (quotes, backslashes, filter syntax, any script).
tag_text = st.one_of(st.sampled_from([t for t in NASTY_TEXT if len(t) <= 256 and not any(
    ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in t)]), st.text(st.characters(exclude_categories=("Cc", "Cs")),
                                                                  max_size=30))
tag_maps = st.one_of(
    st.just({}),
    st.dictionaries(st.sampled_from(["mood", "k", "a.b-c_d", "K-9"]), tag_text, min_size=1, max_size=3),  # valid
    st.dictionaries(text, text, max_size=4),
    st.dictionaries(st.sampled_from(["mood", "k", "a.b-c_d"]), text, min_size=1, max_size=3),
    st.sampled_from([{"mood": "café"}, {"mood": "a\x00"}, {"k\n": "v"}, {"café": "v"}, {"k": '"'}, {"k": "\\"}]),
)
# Mostly a valid request id, so that the other fields get tested too.
request_ids = st.one_of(st.just(""), st.just(""), st.just("req-hostile"), text)
INT32 = [0, 1, -1, 2, 5, 7, 31, 100, 1000, 10**6, 2**31 - 1, -2**31]
int32s = st.one_of(st.sampled_from(INT32), st.integers(-2**31, 2**31 - 1))
small_or_int32s = st.one_of(st.integers(0, 20), int32s)
tokens = st.one_of(st.just(""), st.just(""), text)
int64s = st.sampled_from([0, 1, -1, 42, 2**31, 2**63 - 1, -2**63])
FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-9, -1.0, 0.5, 1.0, 1e308, 3.4e38, 5e-324]
floats = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True))
pattern_ids = st.one_of(text, st.uuids().map(str), st.uuids().map(lambda u: str(u).upper()),
                        st.uuids().map(lambda u: str(u) + "' or '1'='1"))


# --- the world the properties run in ----------------------------------------------------------------------------------
class World:
    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20),
                                                               ("grpc.max_receive_message_length", 16 << 20)])
        self.stub = pb_grpc.OrchestratorStub(self.channel)
        self.pattern_ids: list[str] = []
        self.workflow_ids: list[str] = []
        self.initial_vectors: dict[str, str] = {}

    def snapshot(self) -> tuple[list[tuple[str, tuple[tuple[str, str], ...], str]], list[tuple[str, str]]]:
        """(id, tags, checksum of every scalar field) of every pattern; (id, checksum) of every workflow record.
        The vectors are compared once, at the end (:meth:`vectors`)."""
        patterns = []
        token = ""
        while True:
            page = self.stub.ListPatterns(pb.ListPatternsRequest(page_size=1000, page_token=token), timeout=30)
            for p in page.patterns:
                scalars = p.SerializeToString(deterministic=True)
                patterns.append((p.pattern_id, tuple(sorted(p.tags.items())), hashlib.sha256(scalars).hexdigest()))
            token = page.next_page_token
            if not token:
                break
        workflows = []
        token = ""
        while True:
            wpage = self.stub.ListWorkflows(pb.ListWorkflowsRequest(page_size=500, page_token=token), timeout=30)
            workflows += [(w.workflow_id, hashlib.sha256(w.SerializeToString(deterministic=True)).hexdigest())
                          for w in wpage.workflows]
            token = wpage.next_page_token
            if not token:
                break
        return sorted(patterns), sorted(workflows)

    def vectors(self) -> dict[str, str]:
        """Checksums of the seeded patterns' full records, vectors included."""
        return {i: hashlib.sha256(self.stub.GetPattern(pb.GetPatternRequest(pattern_id=i, include_embedding=True),
                                                       timeout=30).pattern.SerializeToString(deterministic=True))
                .hexdigest() for i in self.pattern_ids}

    def still_serves(self) -> None:
        """A valid request succeeds: bad input has not opened a breaker or broken the server."""
        self.stub.SearchPatterns(pb.SearchPatternsRequest(embedding=common_pb2.Embedding(values=[0.1] * DIM),
                                                          top_k=1), timeout=30)
        self.stub.GetPattern(pb.GetPatternRequest(pattern_id=self.pattern_ids[0]), timeout=30)


@pytest.fixture(scope="module")
def world(orchestrator: OrchestratorProcess) -> Iterator[World]:
    w = World(orchestrator.target)
    seeds = [{"mood": "café", "n": "0"}, {"mood": 'say "hi"', "n": "1"}, {"mood": "back\\slash", "n": "2"},
             {"mood": "🎹 x'] or not id in ['", "n": "3"}]
    for i, tags in enumerate(seeds):
        resp = w.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(audio=_pcm(tone(0.6, seed=100 + i)), store=True, tags=tags,
                                                          source="hostile-seed"), timeout=60)
        w.pattern_ids.append(resp.pattern_id)
    # One workflow record (a short Compose run to the end), so that the history is not empty.
    events = list(w.stub.Compose(pb.ComposeRequest(request="one second of soft piano", max_tokens=8, seed=1),
                                 timeout=120))
    w.workflow_ids = sorted({e.workflow_id for e in events if e.workflow_id})
    assert w.workflow_ids
    w.initial_vectors = w.vectors()
    yield w
    for pattern_id in w.pattern_ids:
        try:
            w.stub.DeletePattern(pb.DeletePatternRequest(pattern_id=pattern_id), timeout=30)
        except grpc.RpcError:
            pass
    w.channel.close()


def _pcm(samples: np.ndarray, rate: int = 16_000) -> common_pb2.AudioInput:
    return common_pb2.AudioInput(pcm=common_pb2.PcmAudio(data=np.asarray(samples, "<f4").tobytes(),
                                                         sample_rate_hz=rate, channels=1, encoding=1))


def call(fn: Callable[[], Any], allowed: set[grpc.StatusCode]) -> tuple[grpc.StatusCode, Any]:
    """Run one RPC; its status must be in ``allowed`` (OK included by the caller when it may succeed)."""
    try:
        result = fn()
        code = C.OK
    except grpc.RpcError as err:
        result, code = err, err.code()
        assert code not in NEVER, f"{code.name}: {err.details()}"
        assert len(err.details() or "") < 2000, "status messages are bounded"
    assert code in allowed, f"{code.name}: {getattr(result, 'details', lambda: '')()}"
    if currently_in_test_context():
        event(code.name)  # --hypothesis-show-statistics shows how the examples spread over the outcomes
    return code, result


def unchanged(world: World, before: Any) -> None:
    assert world.snapshot() == before, "the stored patterns or workflow records changed"


# --- the reproductions, as regressions ------------------------------------------------------------------------
@pytest.mark.parametrize("payload", INJECTIONS + ['"] or true or ["', "x' or 'a'=='a"])
def test_injected_pattern_ids_are_refused(world: World, payload: str) -> None:
    before = world.snapshot()
    for rpc, req in ((world.stub.DeletePattern, pb.DeletePatternRequest(pattern_id=payload)),
                     (world.stub.GetPattern, pb.GetPatternRequest(pattern_id=payload)),
                     (world.stub.RatePattern, pb.RatePatternRequest(pattern_id=payload, rating=5)),
                     (world.stub.SearchPatterns, pb.SearchPatternsRequest(pattern_id=payload, top_k=5))):
        code, err = call(lambda: rpc(req, timeout=30), {C.INVALID_ARGUMENT})
        assert "pattern id" in err.details() and "UUID" in err.details()
    unchanged(world, before)


def test_unicode_tag_filters_find_their_pattern(world: World) -> None:
    for pattern_id in world.pattern_ids:
        tags = dict(world.stub.GetPattern(pb.GetPatternRequest(pattern_id=pattern_id), timeout=30).pattern.tags)
        listed = world.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={"mood": tags["mood"]}), timeout=30)
        assert [p.pattern_id for p in listed.patterns] == [pattern_id], tags
        found = world.stub.SearchPatterns(pb.SearchPatternsRequest(
            embedding=common_pb2.Embedding(values=[0.1] * DIM), top_k=10, tag_filter={"mood": tags["mood"]}),
            timeout=30)
        assert [m.pattern.pattern_id for m in found.matches] == [pattern_id], tags


@pytest.mark.parametrize("tags", [{"mood": "nul\x00"}, {"mood": "bell\x07"}, {"mood": "c1\x85"}, {"k\x01": "v"},
                                  {"key\n": "v"}, {"café": "v"}, {"": "v"}])
def test_control_characters_and_bad_keys_are_refused_at_store_and_filter_time(world: World,
                                                                               tags: dict[str, str]) -> None:
    before = world.snapshot()
    call(lambda: world.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(audio=_pcm(tone(0.6)), store=True, tags=tags),
                                         timeout=60), {C.INVALID_ARGUMENT})
    call(lambda: world.stub.ListPatterns(pb.ListPatternsRequest(tag_filter=tags), timeout=30), {C.INVALID_ARGUMENT})
    call(lambda: world.stub.SearchPatterns(pb.SearchPatternsRequest(
        embedding=common_pb2.Embedding(values=[0.1] * DIM), tag_filter=tags), timeout=30), {C.INVALID_ARGUMENT})
    unchanged(world, before)


def test_bad_filters_do_not_open_the_milvus_breaker(world: World) -> None:
    """Filters that used to fail inside Milvus (INTERNAL) counted against its breaker: 5 of them took pattern
    memory down for every client."""
    for i in range(12):
        call(lambda: world.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={"mood": f"\x00{i}"}), timeout=30),
             {C.INVALID_ARGUMENT})
        call(lambda: world.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={"mood": f"ça{i}"}), timeout=30),
             {C.OK})
    world.still_serves()


# --- request bytes that are not a protobuf message --------------------------------------------------------------------
SERVICE = pb.DESCRIPTOR.services_by_name["Orchestrator"]
# A bad tag, a bad length, bad UTF-8 in request_id (field 1 of every request), a truncated field.
GARBAGE = [b"\xff", b"\x0a\xff\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x0a\x05ab"]


def _raw(world: World, method: Any) -> Callable[[bytes], Any]:
    path = f"/{SERVICE.full_name}/{method.name}"
    if method.client_streaming:
        rpc = world.channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        return lambda body: list(rpc(iter([body]), timeout=30))
    if method.server_streaming:
        stream = world.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        return lambda body: list(stream(body, timeout=30))
    unary = world.channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    return lambda body: unary(body, timeout=30)


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_undecodable_request_bytes_are_invalid_argument(world: World, method: Any) -> None:
    send = _raw(world, method)
    for body in GARBAGE:
        code, err = call(lambda: send(body), {C.INVALID_ARGUMENT})
        assert err.details().startswith(f"request is not a valid {method.input_type.full_name} message")


def test_undecodable_message_later_in_a_request_stream(world: World) -> None:
    rpc = world.channel.stream_stream(f"/{SERVICE.full_name}/StreamAnalyze", request_serializer=None,
                                      response_deserializer=None)
    first = pb.StreamAnalyzeRequest(config=pb.StreamAnalyzeConfig(sample_rate_hz=16_000)).SerializeToString()
    code, err = call(lambda: list(rpc(iter([first, b"\x1a\xff\xff"]), timeout=30)), {C.INVALID_ARGUMENT})
    assert "grym.v1.StreamAnalyzeRequest" in err.details()


@CHEAP
@given(body=st.binary(max_size=64), method=st.sampled_from([m for m in SERVICE.methods if m.name in {
    "GetPattern", "DeletePattern", "ListPatterns", "SearchPatterns", "GetWorkflow", "ListWorkflows",
    "RatePattern", "ListPatternClusters"}]))
def test_random_request_bytes(world: World, body: bytes, method: Any) -> None:
    before = world.snapshot()
    call(lambda: _raw(world, method)(body), {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    unchanged(world, before)


# --- every RPC, property-based ----------------------------------------------------------------------------------------
@PROPERTY
@given(pattern_id=pattern_ids, include_embedding=st.booleans(), request_id=request_ids)
@example(pattern_id="x'] or not id in ['", include_embedding=False, request_id="")
def test_get_pattern(world: World, pattern_id: str, include_embedding: bool, request_id: str) -> None:
    before = world.snapshot()
    code, resp = call(lambda: world.stub.GetPattern(pb.GetPatternRequest(
        pattern_id=pattern_id, include_embedding=include_embedding, request_id=request_id), timeout=30),
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    if code == C.OK:
        assert resp.pattern.pattern_id == pattern_id, "never another pattern than the one named"
    unchanged(world, before)


@PROPERTY
@given(pattern_id=pattern_ids, request_id=request_ids)
@example(pattern_id="x'] or not id in ['", request_id="")
def test_delete_unknown_pattern(world: World, pattern_id: str, request_id: str) -> None:
    before = world.snapshot()
    call(lambda: world.stub.DeletePattern(pb.DeletePatternRequest(pattern_id=pattern_id, request_id=request_id),
                                          timeout=30), {C.INVALID_ARGUMENT, C.NOT_FOUND})
    unchanged(world, before)


@PROPERTY
@given(query=st.sampled_from(["known", "id", "vector", "hostile vector", "none"]), known=st.integers(0, 3),
       pattern_id=pattern_ids, vector=st.lists(st.floats(-1e3, 1e3), min_size=DIM, max_size=DIM),
       values=st.lists(floats, max_size=40), top_k=small_or_int32s, tag_filter=tag_maps,
       include_embedding=st.booleans(), request_id=request_ids)
def test_search_patterns(world: World, query: str, known: int, pattern_id: str, vector: list[float],
                         values: list[float], top_k: int, tag_filter: dict[str, str], include_embedding: bool,
                         request_id: str) -> None:
    before = world.snapshot()
    req = pb.SearchPatternsRequest(top_k=top_k, tag_filter=tag_filter, include_embedding=include_embedding,
                                   request_id=request_id)
    if query in ("known", "id"):
        req.pattern_id = world.pattern_ids[known] if query == "known" else pattern_id
    elif query != "none":
        req.embedding.values.extend(vector if query == "vector" else values)
    code, resp = call(lambda: world.stub.SearchPatterns(req, timeout=30), {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    if code == C.OK:
        for match in resp.matches:
            assert all(match.pattern.tags.get(k) == v for k, v in tag_filter.items())
    unchanged(world, before)


@PROPERTY
@given(page_size=small_or_int32s, page_token=tokens, tag_filter=tag_maps, request_id=request_ids)
def test_list_patterns(world: World, page_size: int, page_token: str, tag_filter: dict[str, str],
                       request_id: str) -> None:
    before = world.snapshot()
    code, resp = call(lambda: world.stub.ListPatterns(pb.ListPatternsRequest(
        page_size=page_size, page_token=page_token, tag_filter=tag_filter, request_id=request_id), timeout=30),
        {C.OK, C.INVALID_ARGUMENT})
    if code == C.OK:
        for p in resp.patterns:
            assert all(p.tags.get(k) == v for k, v in tag_filter.items())
    unchanged(world, before)


@PROPERTY
@given(known=st.booleans(), pattern_id=pattern_ids, rating=st.one_of(st.integers(1, 5), int32s), comment=text,
       request_id=request_ids)
def test_rate_pattern(world: World, known: bool, pattern_id: str, rating: int, comment: str, request_id: str) -> None:
    before = world.snapshot()
    target = world.pattern_ids[0] if known else pattern_id
    code, resp = call(lambda: world.stub.RatePattern(pb.RatePatternRequest(
        pattern_id=target, rating=rating, comment=comment, request_id=request_id), timeout=30),
        {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    if code == C.OK:
        assert known and 1 <= rating <= 5 and resp.pattern_id == target and 1 <= resp.mean_rating <= 5
    unchanged(world, before)


@PROPERTY
@given(workflow_id=st.one_of(text, st.uuids().map(str)), request_id=request_ids)
@example(workflow_id="x' OR '1'='1", request_id="")
def test_get_workflow(world: World, workflow_id: str, request_id: str) -> None:
    before = world.snapshot()
    code, resp = call(lambda: world.stub.GetWorkflow(pb.GetWorkflowRequest(workflow_id=workflow_id,
                                                                           request_id=request_id), timeout=30),
                      {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND})
    if code == C.OK:
        assert resp.workflow.workflow_id == workflow_id
    unchanged(world, before)


@PROPERTY
@given(page_size=small_or_int32s, page_token=tokens, state=st.one_of(st.integers(0, 7), int32s),
       request_id=request_ids)
def test_list_workflows(world: World, page_size: int, page_token: str, state: int, request_id: str) -> None:
    before = world.snapshot()
    call(lambda: world.stub.ListWorkflows(pb.ListWorkflowsRequest(page_size=page_size, page_token=page_token,
                                                                  state=state, request_id=request_id), timeout=30),
         {C.OK, C.INVALID_ARGUMENT})
    unchanged(world, before)


@CHEAP
@given(cluster_count=small_or_int32s, request_id=request_ids)
def test_list_pattern_clusters(world: World, cluster_count: int, request_id: str) -> None:
    before = world.snapshot()
    call(lambda: world.stub.ListPatternClusters(pb.ListPatternClustersRequest(cluster_count=cluster_count,
                                                                              request_id=request_id), timeout=60),
         {C.OK, C.INVALID_ARGUMENT})
    unchanged(world, before)


# --- writes: accepted input is stored exactly, then removed ----------------------------------------------------------
def _stored_exactly(world: World, pattern_id: str, tags: dict[str, str], before: Any) -> None:
    got = world.stub.GetPattern(pb.GetPatternRequest(pattern_id=pattern_id), timeout=30).pattern
    assert dict(got.tags) == tags, "tags round-trip exactly"
    for key, value in tags.items():
        listed = world.stub.ListPatterns(pb.ListPatternsRequest(tag_filter={key: value}, page_size=1000), timeout=30)
        assert pattern_id in [p.pattern_id for p in listed.patterns], f"stored tag {key}={value!r} filters"
    world.stub.DeletePattern(pb.DeletePatternRequest(pattern_id=pattern_id), timeout=30)
    unchanged(world, before)


audio_inputs = st.one_of(
    st.builds(lambda data, rate, channels, enc: common_pb2.AudioInput(pcm=common_pb2.PcmAudio(
        data=data, sample_rate_hz=rate, channels=channels, encoding=enc)),
        st.one_of(st.binary(max_size=4096), st.just(np.asarray(tone(0.5), "<f4").tobytes())),
        st.one_of(st.just(16_000), int32s), st.one_of(st.just(1), int32s), st.one_of(st.sampled_from([0, 1, 2]),
                                                                                      int32s)),
    st.builds(lambda wav: common_pb2.AudioInput(wav=wav), st.binary(max_size=256)),
    st.just(common_pb2.AudioInput()),
    st.just(_pcm(tone(0.5))),
)


@PROPERTY
@given(audio=audio_inputs, store=st.booleans(), tags=tag_maps, source=text, include_features=st.booleans(),
       request_id=request_ids)
def test_analyze_audio(world: World, audio: common_pb2.AudioInput, store: bool, tags: dict[str, str], source: str,
                       include_features: bool, request_id: str) -> None:
    before = world.snapshot()
    code, resp = call(lambda: world.stub.AnalyzeAudio(pb.AnalyzeAudioRequest(
        audio=audio, store=store, tags=tags, source=source, include_features=include_features,
        request_id=request_id), timeout=60), {C.OK, C.INVALID_ARGUMENT, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED})
    if code == C.OK and store:
        _stored_exactly(world, resp.pattern_id, tags, before)
    else:
        unchanged(world, before)


@CHEAP
@given(rate=st.one_of(st.just(16_000), st.just(16_000), int32s), channels=st.one_of(st.just(1), st.just(1), int32s),
       encoding=st.one_of(st.sampled_from([0, 1]), int32s), store=st.booleans(), tags=tag_maps, source=text,
       chunks=st.lists(st.one_of(st.just(np.asarray(tone(0.3), "<f4").tobytes()), st.binary(max_size=2048),
                                 st.just(np.asarray(tone(0.3), "<f4").tobytes()[:-1])), min_size=1, max_size=3),
       config_again=st.booleans(), request_id=request_ids)
def test_stream_analyze(world: World, rate: int, channels: int, encoding: int, store: bool, tags: dict[str, str],
                        source: str, chunks: list[bytes], config_again: bool, request_id: str) -> None:
    before = world.snapshot()
    config = pb.StreamAnalyzeRequest(request_id=request_id, config=pb.StreamAnalyzeConfig(
        sample_rate_hz=rate, channels=channels, encoding=encoding, store=store, tags=tags, source=source))
    msgs = [config, *(pb.StreamAnalyzeRequest(audio_content=c) for c in chunks)] + ([config] if config_again else [])
    code, resp = call(lambda: list(world.stub.StreamAnalyze(iter(msgs), timeout=60)),
                      {C.OK, C.INVALID_ARGUMENT, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED})
    final = [r for r in resp if r.is_final] if code == C.OK else []
    if final and final[0].pattern_id:
        _stored_exactly(world, final[0].pattern_id, tags, before)
    else:
        unchanged(world, before)


@CHEAP
@given(prompt=text, negative=text, duration=st.one_of(st.sampled_from([0.25, 0.5]), floats),
       steps=st.one_of(st.sampled_from([1, 2]), int32s), guidance=st.one_of(st.none(), floats),
       seed=st.one_of(st.none(), int64s), scheduler=st.one_of(st.sampled_from([0, 1, 2]), int32s),
       tags=tag_maps, request_id=request_ids)
@example(prompt="calm piano", negative="", duration=1e-9, steps=1, guidance=None, seed=None, scheduler=0, tags={},
         request_id="")  # issue 11: only Triton rejected it, and five of them opened the breaker
def test_generate(world: World, prompt: str, negative: str, duration: float, steps: int, guidance: float | None,
                  seed: int | None, scheduler: int, tags: dict[str, str], request_id: str) -> None:
    before = world.snapshot()
    # 0 means "the server's default" (seconds of audio, tens of steps): a real generation, too slow for a property.
    req = pb.GenerateRequest(prompt=prompt, negative_prompt=negative, duration_seconds=duration or 0.25,
                             steps=steps or 1, scheduler=scheduler, store=False, tags=tags, request_id=request_id)
    if guidance is not None:
        req.guidance_scale = guidance
    if seed is not None:
        req.seed = seed
    call(lambda: list(world.stub.Generate(req, timeout=120)), {C.OK, C.INVALID_ARGUMENT})
    unchanged(world, before)
    world.still_serves()


@settings(CHEAP, max_examples=15)
@given(request=text, max_tokens=int32s, seed=st.one_of(st.none(), int64s), tags=tag_maps, request_id=request_ids)
def test_compose_refuses_bad_requests(world: World, request: str, max_tokens: int, seed: int | None,
                                      tags: dict[str, str], request_id: str) -> None:
    """Compose with adversarial fields. To stay cheap the examples always carry one invalid field (a negative
    max_tokens); valid adversarial requests are run to the end in the test below."""
    before = world.snapshot()
    req = pb.ComposeRequest(request=request, max_tokens=-abs(max_tokens) - 1, tags=tags, request_id=request_id)
    if seed is not None:
        req.seed = seed
    call(lambda: list(world.stub.Compose(req, timeout=60)), {C.INVALID_ARGUMENT})
    unchanged(world, before)


@pytest.mark.parametrize("request_text", ["one second of x'] or not id in [' piano", 'one second "calm" \\ café 🎹'])
def test_compose_with_adversarial_text_runs_or_refuses_cleanly(world: World, request_text: str) -> None:
    before_patterns, before_workflows = world.snapshot()
    code, resp = call(lambda: list(world.stub.Compose(pb.ComposeRequest(request=request_text, max_tokens=8, seed=3,
                                                                        tags={"who": "x'] or not id in ['"}),
                                                      timeout=120)), {C.OK, C.INVALID_ARGUMENT})
    after_patterns, after_workflows = world.snapshot()
    assert set(before_patterns) <= set(after_patterns) and set(before_workflows) <= set(after_workflows)
    if code == C.OK:
        new = {p[0] for p in after_patterns} - {p[0] for p in before_patterns}
        for pattern_id in new:  # what the workflow stored carries the request's tags exactly
            tags = dict(world.stub.GetPattern(pb.GetPatternRequest(pattern_id=pattern_id), timeout=30).pattern.tags)
            assert tags.get("who") == "x'] or not id in ['"
            world.stub.DeletePattern(pb.DeletePatternRequest(pattern_id=pattern_id), timeout=30)


def test_the_server_still_serves_after_everything(world: World) -> None:
    world.still_serves()
    assert world.vectors() == world.initial_vectors, "no stored vector changed"
    health = world.channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                       response_deserializer=None)
    assert health(b"", timeout=10) == b"\x08\x01"  # SERVING
