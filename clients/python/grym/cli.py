"""``grym``: command-line client for a grym-synth server.

examples:
  grym --target localhost:50051 analyze song.wav --store --tag mood=calm
  grym analyze song.flac --json > song.json            # everything the server returned, full embedding included
  grym stream long.mp3                                  # StreamAnalyze: one line per window as it arrives
  grym generate "warm analog pad, slow attack" --seconds 5 --steps 10 --out pad.flac
  grym compose "90 second ambient piece, rain, slow build" --out piece.wav
  grym search --pattern-id 3f2c... --top-k 5
  grym patterns list | get ID | delete ID | audio ID --out pattern.wav
  grym health
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

# gRPC's C core logs (e.g. a failed TLS handshake) straight to stderr, which would break "one error line": silence it
# before grpc loads, unless the user asks for it (GRPC_VERBOSITY=debug to diagnose a connection).
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
from google.protobuf.json_format import MessageToDict

from grym._version import __version__
from grym.client import (DEFAULT_SCHEDULER, DEFAULT_TIMEOUT_S, EXTENSION_FORMATS, FORMATS, MODES, MUSIC_DETAILS, SCHEDULERS, SPACES,
                         Client, GrymError, analyze_request, channel_credentials, compose_request, describe_request,
                         generate_request, music_filter, output_format, read_token, same_format, search_request,
                         stream_requests)
from grym.v1 import common_pb2, orchestrator_pb2 as pb

EXIT_OK = 0
EXIT_SERVER = 1  # the server answered with an error status, is not serving, or a workflow did not succeed
EXIT_USAGE = 2  # bad flags or input: a missing or undecodable file, an unknown output extension
EXIT_INTERRUPTED = 130
LONG_TIMEOUT_S = 600.0  # generate and compose: minutes of model work are normal, not a hung server

EPILOG = """exit codes: 0 ok; 1 the server answered with an error (its gRPC code is printed), is not serving, or
a workflow did not succeed; 2 a usage or input error (bad flag, missing file, unknown output extension);
130 interrupted. Errors are one line on stderr.

environment: GRYM_TARGET (--target), GRYM_TOKEN (the bearer token; --token-file wins), GRYM_TOKEN_FILE.
Every option above the command may also follow it (grym analyze x.wav --json). See docs/cli.md."""


class UsageError(Exception):
    """A mistake in the command line or its input that the user can fix (exit 2)."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr (exit 2), like every other error of the CLI."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default shown in its help (unless it has none), examples kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or any(
                action.default is x for x in (None, False, argparse.SUPPRESS)):
            return text
        return text + (" (default: '')" if action.default == "" else " (default: %(default)s)")


def _json(message: Any) -> dict[str, Any]:
    """A protobuf message as the JSON mapping with the proto's own (snake_case) names and every field shown."""
    return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


# --- arguments ------------------------------------------------------------------------------------------------------
def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes. On the top parser they carry the defaults; on each command they default to
    SUPPRESS, so that a value given after the command overrides one given before it and neither is lost."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--target", default=default(os.environ.get("GRYM_TARGET", "localhost:50051")),
                        help="server address host:port (env GRYM_TARGET)")
    parser.add_argument("--timeout", type=float, default=default(None),
                        help=f"deadline of each call, seconds (default: {DEFAULT_TIMEOUT_S:g}; generate and compose: "
                             f"{LONG_TIMEOUT_S:g})")
    parser.add_argument("--token-file", default=default(os.environ.get("GRYM_TOKEN_FILE")),
                        help="file whose first line is the bearer token (else env GRYM_TOKEN)")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="use TLS, trusting the system's CA roots (implied by any --tls-* option)")
    parser.add_argument("--tls-ca", default=default(None), help="PEM CA bundle that signed the server's certificate")
    parser.add_argument("--tls-cert", default=default(None), help="PEM client certificate (mTLS; with --tls-key)")
    parser.add_argument("--tls-key", default=default(None), help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", default=default(None),
                        help="name to verify in the server certificate instead of the --target host")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print one JSON document (snake_case, every field the server returned)")


def _command(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                            allow_abbrev=False)
    _connection_options(parser, top=False)
    return parser


def _tag_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--tag", action="append", metavar="KEY=VALUE", default=None,
                        help=f"{what} (repeatable)")


def _out_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    exts = ", ".join(sorted(EXTENSION_FORMATS))
    parser.add_argument("--out", default=default, required=default is None,
                        help=f"file to write; its extension picks the format ({exts}; .ogg is Opus)")
    parser.add_argument("--format", choices=list(FORMATS), default=None,
                        help="audio format, when the extension does not say enough (wav24: 24-bit WAV)")


def _music_filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-tempo", type=float, default=0.0, metavar="BPM", help="lowest tempo (0: no bound)")
    parser.add_argument("--max-tempo", type=float, default=0.0, metavar="BPM", help="highest tempo (0: no bound)")
    parser.add_argument("--key", default="", help='exact key, e.g. "A minor" (empty: any)')
    parser.add_argument("--music-tag", action="append", default=None, metavar="LABEL",
                        help="tagger label the pattern must carry, e.g. guitar (repeatable)")


def build_parser() -> Parser:
    # allow_abbrev=False: a script's --see must not silently mean --seed today and fail when --seek is added.
    parser = Parser(prog="grym", description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter,
                    allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"grym {__version__}")
    _connection_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = _command(sub, "analyze", "analyse an audio file (WAV; FLAC/OGG/MP3 where the server decodes them)")
    analyze.add_argument("file", metavar="FILE", help="audio file, or - for standard input")
    analyze.add_argument("--store", action="store_true", help="store the embedding as a pattern")
    _tag_option(analyze, "key=value label for the stored pattern")
    analyze.add_argument("--features", action="store_true", help="also fetch the per-frame features")
    analyze.add_argument("--music-detail", choices=list(MUSIC_DETAILS), default=None,
                         help="how much music description to ask for (unset: the server's, the summary)")
    analyze.add_argument("--midi", metavar="OUT.mid", default=None,
                         help="write the transcribed notes as a MIDI file (asks for --music-detail full)")

    stream = _command(sub, "stream", "analyse long audio with StreamAnalyze, printing each window as it arrives")
    stream.add_argument("file", metavar="FILE", help="audio file (decoded here), or - for standard input")
    stream.add_argument("--features", action="store_true", help="also fetch each window's per-frame features")
    stream.add_argument("--store", action="store_true", help="store the whole stream's embedding as a pattern")
    _tag_option(stream, "key=value label for the stored pattern")
    stream.add_argument("--music-detail", choices=list(MUSIC_DETAILS), default=None,
                        help="music description of the final result (unset: the server's, the summary)")
    stream.add_argument("--jsonl", action="store_true", help="print each message as one JSON line as it arrives")

    describe = _command(sub, "describe", "describe audio in words (DescribeAudio)")
    source = describe.add_mutually_exclusive_group(required=True)
    source.add_argument("file", metavar="FILE", nargs="?", help="audio file, or - for standard input")
    source.add_argument("--pattern", metavar="ID", help="describe a stored pattern instead")

    gen = _command(sub, "generate", "generate audio from a text prompt (AudioLDM)")
    gen.add_argument("prompt")
    gen.add_argument("--seconds", type=float, default=0.0, help="audio length in seconds (0: the server's, 5)")
    gen.add_argument("--steps", type=int, default=0, help="denoising steps (0: the server's, 10)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (unset: the server's)")
    gen.add_argument("--seed", type=int, default=None, help="seed for reproducible audio (unset: server picks)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS), help="diffusion scheduler")
    _out_options(gen, "generated.wav")
    init = gen.add_mutually_exclusive_group()
    init.add_argument("--init", metavar="FILE", default=None, help="audio to vary or continue")
    init.add_argument("--init-pattern", metavar="ID", default=None, help="stored pattern whose audio to use")
    gen.add_argument("--mode", choices=list(MODES), default=None,
                     help="text, vary or continue (unset: vary with init audio, else text)")
    gen.add_argument("--strength", type=float, default=None,
                     help="vary: how far the init audio is noised, 0-1 (unset: the server's, 0.6)")
    gen.add_argument("--store", action="store_true", help="store the result as a pattern")
    _tag_option(gen, "key=value label for the stored pattern")

    comp = _command(sub, "compose", "compose from a musical request (coordinator LLM + workflow)")
    comp.add_argument("request")
    _out_options(comp, "composition.wav")
    comp.add_argument("--seconds", type=float, default=0.0,
                      help="length of the piece (0: what the request says, or the server's)")
    comp.add_argument("--max-tokens", type=int, default=0, help="coordinator token budget (0: server default)")
    comp.add_argument("--seed", type=int, default=None, help="coordinator sampling seed (unset: random)")
    _tag_option(comp, "key=value label for stored patterns")
    comp.add_argument("--quiet-tokens", action="store_true",
                      help="do not print the coordinator's text (printed only on a terminal anyway)")

    wf = _command(sub, "workflows", "list workflows or show one")
    wf.add_argument("workflow_id", nargs="?", metavar="ID", help="the workflow to show (unset: list them)")
    wf.add_argument("--limit", type=int, default=50, help="most workflows listed")

    clusters = _command(sub, "clusters", "recurring patterns (clusters of stored embeddings)")
    clusters.add_argument("--count", type=int, default=0, help="number of clusters (0: the server chooses)")

    rate = _command(sub, "rate", "rate a stored pattern 1-5")
    rate.add_argument("pattern_id", metavar="ID")
    rate.add_argument("rating", type=int)
    rate.add_argument("--comment", default="", help="free text")

    search = _command(sub, "search", "find similar stored patterns")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--pattern-id", metavar="ID", help="search near a stored pattern")
    query.add_argument("--like", metavar="FILE", help="analyse this audio file and search near it")
    query.add_argument("--text", help='search by words, e.g. "dark guitar with drums"')
    search.add_argument("--top-k", type=int, default=5, help="number of matches")
    _tag_option(search, "only patterns with key=value")
    search.add_argument("--space", choices=list(SPACES), default=None,
                        help="embedding space compared (unset: music for text and where patterns carry it)")
    _music_filter_options(search)
    search.add_argument("--include-embedding", action="store_true", help="return each match's embedding")

    patterns = _command(sub, "patterns", "list, get, delete stored patterns or fetch their audio")
    psub = patterns.add_subparsers(dest="action", required=True, metavar="ACTION")
    plist = _command(psub, "list", "list stored patterns, newest first")
    _tag_option(plist, "only patterns with key=value")
    plist.add_argument("--limit", type=int, default=50, help="most patterns listed")
    pget = _command(psub, "get", "show one stored pattern")
    pget.add_argument("pattern_id", metavar="ID")
    pget.add_argument("--embedding", action="store_true", help="include the embedding")
    _command(psub, "delete", "delete one stored pattern").add_argument("pattern_id", metavar="ID")
    paudio = _command(psub, "audio", "write a stored pattern's audio to a file (GetPatternAudio)")
    paudio.add_argument("pattern_id", metavar="ID")
    _out_options(paudio, None)

    health = _command(sub, "health", "check the server's health")
    health.add_argument("--service", default="", help="'' (the whole server), triton, milvus or generation")

    completion = _command(sub, "completion", "print a shell completion script: source <(grym completion bash)")
    completion.add_argument("shell", choices=["bash", "zsh"])
    return parser


# --- small helpers --------------------------------------------------------------------------------------------------
def _tags(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--tag expects key=value, got {pair!r}")
        out[key] = value
    return out


def read_input(path: str) -> bytes:
    """The bytes of an input file, or of standard input for ``-``; a file that cannot be read is a usage error."""
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path!r}: {exc.strerror}") from None


def _output_format(args: argparse.Namespace) -> int:
    try:
        return output_format(args.out, args.format)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_writable(path: str) -> None:
    """Fail before a long call rather than after it: the output's folder must exist."""
    folder = Path(path).expanduser().resolve().parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path!r}: no folder {str(folder)!r}")


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal (never into files or pipes)."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.drawn = False

    def show(self, step: int, total: int, label: str = "step", width: int = 30) -> None:
        if not self.enabled:
            return
        filled = int(width * step / max(total, 1))
        print(f"\r[{'#' * filled}{'.' * (width - filled)}] {label} {step}/{total}", end="", file=sys.stderr,
              flush=True)
        self.drawn = True

    def say(self, text: str) -> None:
        """A narrative line (coordinator text, step states): on a terminal only, like the bar."""
        if self.enabled:
            self.done()
            print(text, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.drawn:
            print(file=sys.stderr, flush=True)
            self.drawn = False


class AudioSink:
    """Collects streamed audio chunks and writes them to ``path`` once complete, refusing audio in a format other
    than the one asked for (a server that does not know output formats answers WAV)."""

    def __init__(self, path: str, requested: int) -> None:
        self.path, self.requested = path, requested
        self.chunks: list[Any] = []

    def add(self, chunk: Any) -> None:
        self.chunks.append(chunk)

    def write(self) -> dict[str, Any] | None:
        if not self.chunks:
            return None
        returned = self.chunks[0].format
        if not same_format(self.requested, returned):
            raise GrymError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"the server sent {_format_name(returned)} audio, not {_format_name(self.requested)} "
                            f"(it predates output formats?); nothing written to {self.path}")
        data = b"".join(c.wav_data for c in sorted(self.chunks, key=lambda c: c.chunk_index))
        try:
            Path(self.path).expanduser().write_bytes(data)
        except OSError as exc:
            raise UsageError(f"cannot write {self.path!r}: {exc.strerror}") from None
        return {"path": self.path, "format": _format_name(returned or common_pb2.AUDIO_FORMAT_WAV_PCM16),
                "bytes": len(data), "sample_rate_hz": self.chunks[0].sample_rate_hz}


def _format_name(value: int) -> str:
    return common_pb2.AudioFormat.Name(value or common_pb2.AUDIO_FORMAT_WAV_PCM16).removeprefix("AUDIO_FORMAT_")


def _music_summary(music: common_pb2.MusicDescription) -> dict[str, Any]:
    return {"tempo_bpm": round(music.tempo_bpm, 1), "key": music.key,
            "tags": [t.label for t in music.tags[:5]], "notes": len(music.notes),
            "vocal_segments": len(music.vocal_segments)}


# --- commands -------------------------------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace, client: Client) -> int:
    detail = args.music_detail
    if args.midi:
        if detail not in (None, "full"):
            raise UsageError("--midi needs the notes: use --music-detail full (or leave it out)")
        detail = "full"
    req = analyze_request(read_input(args.file), include_features=args.features, store=args.store,
                          tags=_tags(args.tag), music_detail=detail)
    resp = client.call("AnalyzeAudio", req)
    midi = None
    if args.midi:
        from grym.midi import write_midi

        try:
            midi = {"path": args.midi, "notes": write_midi(args.midi, resp.music.notes)}
        except OSError as exc:
            raise UsageError(f"cannot write {args.midi!r}: {exc.strerror}") from None
    if args.json:
        doc = _json(resp)
        if midi:
            doc["midi"] = midi
        _print_json(doc)
        return EXIT_OK
    out: dict[str, Any] = {"request_id": resp.request_id, "frames": resp.frames,
                           "duration_seconds": round(resp.duration_seconds, 3), "embedding_dim": len(resp.embedding),
                           "embedding_head": [round(float(x), 5) for x in resp.embedding[:4]]}
    if resp.pattern_id:
        out.update(pattern_id=resp.pattern_id, tags=dict(resp.tags))
    if resp.HasField("features"):
        out["features_shape"] = [resp.features.rows, resp.features.cols]
    if resp.HasField("music"):
        out["music"] = _music_summary(resp.music)
    if midi:
        out["midi"] = midi
    _print_json(out)
    return EXIT_OK


def decode_audio(data: bytes, name: str) -> tuple[Any, int]:
    """Decode an audio file here (libsndfile: WAV, FLAC, OGG, MP3) to float32 frames x channels."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as exc:  # libsndfile's errors have no common base that says "undecodable": all are input
        raise UsageError(f"cannot decode {name!r} as audio: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return samples, int(rate)


def cmd_stream(args: argparse.Namespace, client: Client) -> int:
    samples, rate = decode_audio(read_input(args.file), args.file)
    reqs = stream_requests(samples, rate, include_features=args.features, store=args.store, tags=_tags(args.tag),
                           music_detail=args.music_detail)
    windows: list[dict[str, Any]] = []
    final: dict[str, Any] | None = None
    request_id = ""
    for msg in client.stream("StreamAnalyze", reqs):
        request_id = msg.request_id
        doc = _json(msg)
        if args.jsonl:
            print(json.dumps(doc, separators=(",", ":")), flush=True)
        elif not args.json:
            if msg.is_final:
                stored = f", pattern {msg.pattern_id}" if msg.pattern_id else ""
                print(f"final: {msg.window_index} windows, {msg.end_seconds:.2f} s, {msg.frames} frames{stored}",
                      flush=True)
            else:
                print(f"window {msg.window_index}: {msg.start_seconds:.2f}-{msg.end_seconds:.2f} s, "
                      f"{msg.frames} frames", flush=True)
        if msg.is_final:
            final = doc
        else:
            windows.append(doc)
    if args.json and not args.jsonl:
        _print_json({"request_id": request_id, "windows": windows, "final": final})
    return EXIT_OK


def cmd_describe(args: argparse.Namespace, client: Client) -> int:
    audio = read_input(args.file) if args.file else None
    resp = client.call("DescribeAudio", describe_request(audio, args.pattern))
    if args.json:
        _print_json(_json(resp))
    else:
        print(resp.caption)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace, client: Client) -> int:
    fmt = _output_format(args)
    _check_writable(args.out)
    init = read_input(args.init) if args.init else None
    try:
        req = generate_request(args.prompt, seconds=args.seconds, steps=args.steps, guidance_scale=args.guidance,
                               seed=args.seed, negative_prompt=args.negative, scheduler=args.scheduler,
                               store=args.store, tags=_tags(args.tag), output_format=fmt, mode=args.mode,
                               init_audio=init, init_pattern_id=args.init_pattern or "", init_strength=args.strength)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    progress, sink = Progress(), AudioSink(args.out, fmt)
    result, request_id, steps = None, "", 0
    for event in client.stream("Generate", req):
        request_id = event.request_id
        kind = event.WhichOneof("event")
        if kind == "progress":
            steps += 1
            progress.show(event.progress.step, event.progress.total_steps)
        elif kind == "audio":
            sink.add(event.audio)
        elif kind == "result":
            result = event.result
    progress.done()
    output = sink.write()
    if result is None:
        raise GrymError(grpc.StatusCode.FAILED_PRECONDITION, "the Generate stream ended without a result")
    if args.json:
        _print_json({"request_id": request_id, "result": _json(result), "output": output, "progress_events": steps})
        return EXIT_OK
    out = {"request_id": request_id, "out": args.out, "seed": result.seed,
           "duration_seconds": round(result.duration_seconds, 3), "sample_rate_hz": result.sample_rate_hz,
           "frames": result.frames, "cached": result.cached}
    if result.pattern_id:
        out["pattern_id"] = result.pattern_id
    _print_json(out)
    return EXIT_OK


def _compose_narrative(event: pb.ComposeResponse, progress: Progress, state: dict[str, Any]) -> None:
    """What a person at a terminal sees while a piece is composed: coordinator text, the plan, step states."""
    kind = event.WhichOneof("event")
    if kind == "token" and not state["quiet"] and progress.enabled:
        label = "thinking" if event.token.kind == pb.CoordinatorToken.KIND_THINKING else "answer"
        if label != state.get("label"):
            progress.say(f"\n--- coordinator {label} ---")
            state["label"] = label
        print(event.token.text, end="", file=sys.stderr, flush=True)
    elif kind == "plan":
        planner = pb.ComposePlan.Planner.Name(event.plan.planner).removeprefix("PLANNER_").lower()
        reason = f" ({event.plan.fallback_reason})" if event.plan.fallback_reason else ""
        progress.say(f"\n--- plan by {planner}{reason} ---\n{event.plan.plan_json}")
    elif kind == "step":
        st = event.step
        if st.state == pb.ComposeStep.STATE_PROGRESS:
            progress.show(st.done, st.total, f"{st.step_id}")
        else:
            name = pb.ComposeStep.State.Name(st.state).removeprefix("STATE_").lower()
            progress.say(f"  {st.step_id} ({st.step_type}) {name} {(st.error or st.summary_json)[:200]}")
    elif kind == "progress":
        progress.show(event.progress.done, event.progress.total, "piece")


def cmd_compose(args: argparse.Namespace, client: Client) -> int:
    fmt = _output_format(args)
    _check_writable(args.out)
    req = compose_request(args.request, max_tokens=args.max_tokens, seed=args.seed, tags=_tags(args.tag),
                          output_format=fmt, seconds=args.seconds)
    progress, sink = Progress(), AudioSink(args.out, fmt)
    doc: dict[str, Any] = {"request_id": "", "workflow_id": "", "plan": None, "steps": [], "features": [],
                           "sections": [], "summary": None}
    state: dict[str, Any] = {"quiet": args.quiet_tokens}
    summary = None
    for event in client.stream("Compose", req):
        doc["request_id"], doc["workflow_id"] = event.request_id, event.workflow_id
        _compose_narrative(event, progress, state)
        kind = event.WhichOneof("event")
        if kind == "plan":
            doc["plan"] = _json(event.plan)
        elif kind == "step" and event.step.state != pb.ComposeStep.STATE_PROGRESS:
            doc["steps"].append(_json(event.step))
        elif kind == "features":
            doc["features"].append(_json(event.features))
        elif kind == "section_audio":
            section = _json(event.section_audio)
            section.pop("data", None)
            doc["sections"].append({**section, "bytes": len(event.section_audio.data)})
        elif kind == "audio":
            sink.add(event.audio)
        elif kind == "summary":
            summary = event.summary
    progress.done()
    doc["output"] = sink.write()
    if summary is None:
        raise GrymError(grpc.StatusCode.FAILED_PRECONDITION, "the Compose stream ended without a summary")
    doc["summary"] = _json(summary)
    if args.json:
        _print_json(doc)
    else:
        _print_json({"workflow_id": summary.workflow_id, "state": pb.Workflow.State.Name(summary.state),
                     "planner": summary.planner, "fallback_reason": summary.fallback_reason,
                     "audio_seconds": round(summary.audio_seconds, 2), "pattern_ids": list(summary.pattern_ids),
                     "out": args.out if doc["output"] else None})
    if summary.state != pb.Workflow.STATE_SUCCEEDED:
        state_name = pb.Workflow.State.Name(summary.state).removeprefix("STATE_")
        print(f"grym: error: workflow {summary.workflow_id} {state_name}: {_one_line(summary.error)}", file=sys.stderr)
        return EXIT_SERVER
    return EXIT_OK


def cmd_workflows(args: argparse.Namespace, client: Client) -> int:
    if args.workflow_id:
        _print_json(_json(client.call("GetWorkflow", pb.GetWorkflowRequest(workflow_id=args.workflow_id)).workflow))
        return EXIT_OK
    resp = client.call("ListWorkflows", pb.ListWorkflowsRequest(page_size=max(1, min(args.limit, 500))))
    if args.json:
        _print_json(_json(resp))
    for w in [] if args.json else resp.workflows:
        print(f"{w.workflow_id}  {pb.Workflow.State.Name(w.state):18} {w.planner:11} {w.request[:60]}")
    return EXIT_OK


def cmd_clusters(args: argparse.Namespace, client: Client) -> int:
    resp = client.call("ListPatternClusters", pb.ListPatternClustersRequest(cluster_count=args.count))
    if args.json:
        _print_json(_json(resp))
    for c in [] if args.json else resp.clusters:
        print(f"{c.size:4}  {c.label:40} cohesion={c.cohesion:.2f} rating={c.mean_rating:.1f}")
    return EXIT_OK


def cmd_rate(args: argparse.Namespace, client: Client) -> int:
    r = client.call("RatePattern", pb.RatePatternRequest(pattern_id=args.pattern_id, rating=args.rating,
                                                         comment=args.comment))
    if args.json:
        _print_json(_json(r))
    else:
        print(f"{r.pattern_id}: mean {r.mean_rating:.2f} over {r.rating_count} rating(s)")
    return EXIT_OK


def _pattern_dict(p: common_pb2.Pattern) -> dict[str, Any]:
    return {"pattern_id": p.pattern_id, "model": p.model, "profile": p.profile,
            "duration_seconds": round(p.duration_seconds, 3), "tags": dict(p.tags), "source": p.source,
            "create_time": p.create_time.ToJsonString(), "metadata": dict(p.metadata)}


def search_from_args(args: argparse.Namespace, client: Client | None) -> pb.SearchPatternsRequest:
    """The SearchPatterns request the flags mean (``--like`` first analyses the file, hence the client)."""
    embedding = None
    if args.like:
        assert client is not None
        embedding = list(client.call("AnalyzeAudio", analyze_request(read_input(args.like))).embedding)
    music = music_filter(min_tempo_bpm=args.min_tempo, max_tempo_bpm=args.max_tempo, key=args.key,
                         tags=args.music_tag or ())
    return search_request(embedding, args.pattern_id, args.top_k, _tags(args.tag), text=args.text, space=args.space,
                          music=music, include_embedding=args.include_embedding)


def cmd_search(args: argparse.Namespace, client: Client) -> int:
    resp = client.call("SearchPatterns", search_from_args(args, client))
    if args.json:
        _print_json(_json(resp))
    else:
        _print_json([{"score": round(m.score, 4), **_pattern_dict(m.pattern)} for m in resp.matches])
    return EXIT_OK


def cmd_patterns(args: argparse.Namespace, client: Client) -> int:
    if args.action == "list":
        items = []
        for p in client.list_patterns(page_size=max(1, min(args.limit, 1000)), tag_filter=_tags(args.tag)):
            items.append(p)
            if len(items) >= args.limit:
                break
        _print_json({"patterns": [_json(p) for p in items]} if args.json else [_pattern_dict(p) for p in items])
    elif args.action == "get":
        resp = client.call("GetPattern", pb.GetPatternRequest(pattern_id=args.pattern_id,
                                                              include_embedding=args.embedding))
        _print_json(_json(resp.pattern) if args.json else _pattern_dict(resp.pattern))
    elif args.action == "delete":
        resp = client.call("DeletePattern", pb.DeletePatternRequest(pattern_id=args.pattern_id))
        if args.json:
            _print_json(_json(resp))
        else:
            print(f"deleted {resp.pattern_id or args.pattern_id}")
    else:
        fmt = _output_format(args)
        _check_writable(args.out)
        sink, request_id = AudioSink(args.out, fmt), ""
        for msg in client.stream("GetPatternAudio", pb.GetPatternAudioRequest(pattern_id=args.pattern_id,
                                                                               format=fmt)):
            request_id = msg.request_id
            sink.add(msg.audio)
        output = sink.write()
        if output is None:
            raise GrymError(grpc.StatusCode.FAILED_PRECONDITION, f"pattern {args.pattern_id} came without audio")
        if args.json:
            _print_json({"request_id": request_id, "pattern_id": args.pattern_id, "output": output})
        else:
            print(f"wrote {output['path']} ({output['bytes']} bytes, {output['format']})")
    return EXIT_OK


def cmd_health(args: argparse.Namespace, client: Client) -> int:
    status = client.health(args.service)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        print(status)
    if status != "SERVING":
        print(f"grym: error: {args.service or 'the server'} is {status}", file=sys.stderr)
        return EXIT_SERVER
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Client], int]] = {
    "analyze": cmd_analyze, "stream": cmd_stream, "describe": cmd_describe, "generate": cmd_generate,
    "compose": cmd_compose, "workflows": cmd_workflows, "clusters": cmd_clusters, "rate": cmd_rate,
    "search": cmd_search, "patterns": cmd_patterns, "health": cmd_health,
}


# --- shell completion -----------------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps no public list of sub-commands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(every option string, the options that take a value)."""
    flags, valued = [], []
    for action in parser._actions:
        flags += [s for s in action.option_strings if s.startswith("--")]
        if action.option_strings and action.nargs != 0:
            valued += action.option_strings
    return flags, valued


def completion_script(shell: str, parser: argparse.ArgumentParser | None = None) -> str:
    """A bash completion function generated from the parser itself (zsh loads it through bashcompinit), so it
    knows every command, sub-command and option the installed version has."""
    parser = parser or build_parser()
    top_flags, valued = _options(parser)
    cases = []
    for name, sub in _subparsers(parser).items():
        flags, more = _options(sub)
        valued += more
        children = _subparsers(sub)
        for child_name, child in children.items():
            child_flags, child_valued = _options(child)
            valued += child_valued
            cases.append(f'    "{name} {child_name}") words="{" ".join(child_flags)}" ;;')
        cases.append(f'    "{name} "*) words="{" ".join([*children, *flags])}" ;;')
    commands = " ".join(_subparsers(parser))
    body = f"""_grym_complete() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="" cmd="" sub="" w words i skip=0
  local valued=" {" ".join(sorted(set(valued)))} "
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="${{COMP_WORDS[i]}}"
    if ((skip)); then skip=0; continue; fi
    case "$w" in
      -*) [[ "$valued" == *" $w "* ]] && skip=1 ;;
      *) if [[ -z "$cmd" ]]; then cmd="$w"; elif [[ -z "$sub" ]]; then sub="$w"; fi ;;
    esac
  done
  ((skip)) && {{ COMPREPLY=($(compgen -f -- "$cur")); return; }}
  case "$cmd $sub" in
    " ") words="{commands} {" ".join(top_flags)}" ;;
{chr(10).join(cases)}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
  [[ "$cur" != -* ]] && COMPREPLY+=($(compgen -f -- "$cur"))
}}
complete -F _grym_complete grym
"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body


# --- entry point ----------------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(text.split())


def connect(args: argparse.Namespace) -> Client:
    """A client configured from the connection options (token, TLS)."""
    try:
        token = read_token(args.token_file)
        tls = args.tls or any((args.tls_ca, args.tls_cert, args.tls_key))
        credentials = channel_credentials(args.tls_ca, args.tls_cert, args.tls_key) if tls else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    timeout = args.timeout or (LONG_TIMEOUT_S if args.command in ("generate", "compose") else DEFAULT_TIMEOUT_S)
    return Client(args.target, timeout_s=timeout, credentials=credentials, token=token, options=options)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed as one line
        return int(exc.code or 0)
    if args.command == "completion":
        print(completion_script(args.shell), end="")
        return EXIT_OK
    try:
        with connect(args) as client:
            return COMMANDS[args.command](args, client)
    except UsageError as err:
        print(f"grym: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except GrymError as err:
        print(f"grym: error: {err.code.name}: {_one_line(err.message)}", file=sys.stderr)
        return EXIT_SERVER
    except KeyboardInterrupt:
        print("grym: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `grym ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
