"""``grym``: command-line client for a grym-synth server.

    grym --target localhost:50051 analyze song.wav --store --tag mood=calm
    grym generate "warm analog pad, slow attack" --seconds 5 --steps 10 --out pad.wav
    grym compose "90 second ambient piece, rain, slow build"
    grym search --pattern-id 3f2c... --top-k 5
    grym search --like song.wav --tag mood=calm
    grym patterns list | get ID | delete ID
    grym health
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from google.protobuf.json_format import MessageToJson

from grym._version import __version__
from grym.client import DEFAULT_SCHEDULER, SCHEDULERS, Client, GrymError
from grym.v1 import orchestrator_pb2 as pb

EXIT_ERROR = 1


def _tags(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--tag expects key=value, got {pair!r}")
        out[key] = value
    return out


def _pattern_dict(p) -> dict:  # type: ignore[no-untyped-def]
    return {"pattern_id": p.pattern_id, "model": p.model, "profile": p.profile,
            "duration_seconds": round(p.duration_seconds, 3), "tags": dict(p.tags), "source": p.source,
            "create_time": p.create_time.ToJsonString(), "metadata": dict(p.metadata)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grym", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--version", action="version", version=f"grym {__version__}")
    parser.add_argument("--target", default=os.environ.get("GRYM_TARGET", "localhost:50051"),
                        help="server address host:port (env GRYM_TARGET)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each call in seconds")
    sub = parser.add_subparsers(dest="command", required=True)

    analyze = sub.add_parser("analyze", help="analyse a WAV file")
    analyze.add_argument("wav")
    analyze.add_argument("--store", action="store_true", help="store the embedding as a pattern")
    analyze.add_argument("--tag", action="append", help="key=value label for the stored pattern (repeatable)")
    analyze.add_argument("--features", action="store_true", help="also fetch per-frame features")

    gen = sub.add_parser("generate", help="generate audio from a text prompt (AudioLDM)")
    gen.add_argument("prompt")
    gen.add_argument("--seconds", type=float, default=0.0, help="audio length in seconds (0: the server's default)")
    gen.add_argument("--steps", type=int, default=0, help="denoising steps (0: the server's default)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the server's)")
    gen.add_argument("--seed", type=int, help="seed for reproducible audio (default: server picks)")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--scheduler", default=DEFAULT_SCHEDULER, choices=list(SCHEDULERS))
    gen.add_argument("--out", default="generated.wav", help="where to write the WAV")
    gen.add_argument("--store", action="store_true", help="store the result as a pattern")
    gen.add_argument("--tag", action="append", help="key=value label for the stored pattern (repeatable)")

    comp = sub.add_parser("compose", help="compose from a musical request (coordinator LLM + workflow)")
    comp.add_argument("request")
    comp.add_argument("--out", default="composition.wav", help="where to write the WAV")
    comp.add_argument("--max-tokens", type=int, default=0, help="coordinator token budget (0: server default)")
    comp.add_argument("--seed", type=int, help="coordinator sampling seed")
    comp.add_argument("--tag", action="append", help="key=value label for stored patterns (repeatable)")
    comp.add_argument("--quiet-tokens", action="store_true", help="do not print the coordinator's tokens")

    wf = sub.add_parser("workflows", help="list workflows or show one")
    wf.add_argument("workflow_id", nargs="?")

    sub.add_parser("clusters", help="recurring patterns (clusters of stored embeddings)")
    rate = sub.add_parser("rate", help="rate a stored pattern 1-5")
    rate.add_argument("pattern_id")
    rate.add_argument("rating", type=int)
    rate.add_argument("--comment", default="")

    search = sub.add_parser("search", help="find similar stored patterns")
    group = search.add_mutually_exclusive_group(required=True)
    group.add_argument("--pattern-id")
    group.add_argument("--like", metavar="WAV", help="analyse this WAV and search near it")
    search.add_argument("--top-k", type=int, default=5)
    search.add_argument("--tag", action="append", help="only patterns with key=value (repeatable)")

    patterns = sub.add_parser("patterns", help="list, get or delete stored patterns")
    psub = patterns.add_subparsers(dest="action", required=True)
    plist = psub.add_parser("list")
    plist.add_argument("--tag", action="append")
    plist.add_argument("--limit", type=int, default=50)
    psub.add_parser("get").add_argument("pattern_id")
    psub.add_parser("delete").add_argument("pattern_id")

    health = sub.add_parser("health", help="check the server's health")
    health.add_argument("--service", default="", help="'' (whole server), triton, milvus")
    return parser


def _bar(step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / max(total, 1))
    return f"\r[{'#' * filled}{'.' * (width - filled)}] step {step}/{total}"


def _generate(args: argparse.Namespace, client: Client) -> int:
    chunks: list[bytes] = []
    for event in client.generate(args.prompt, seconds=args.seconds, steps=args.steps, guidance_scale=args.guidance,
                                 seed=args.seed, negative_prompt=args.negative, scheduler=args.scheduler,
                                 store=args.store, tags=_tags(args.tag)):
        kind = event.WhichOneof("event")
        if kind == "progress":
            print(_bar(event.progress.step, event.progress.total_steps), end="", file=sys.stderr, flush=True)
        elif kind == "audio":
            chunks.append(event.audio.wav_data)
        elif kind == "result":
            print(file=sys.stderr)
            r = event.result
            with open(args.out, "wb") as f:
                f.write(b"".join(chunks))
            out = {"request_id": event.request_id, "out": args.out, "seed": r.seed,
                   "duration_seconds": round(r.duration_seconds, 3), "sample_rate_hz": r.sample_rate_hz,
                   "frames": r.frames, "cached": r.cached}
            if r.pattern_id:
                out["pattern_id"] = r.pattern_id
            print(json.dumps(out, indent=2))
    return 0


def _compose(args: argparse.Namespace, client: Client) -> int:
    chunks: list[bytes] = []
    kind_now = None
    for event in client.compose(args.request, max_tokens=args.max_tokens, seed=args.seed, tags=_tags(args.tag)):
        kind = event.WhichOneof("event")
        if kind == "token" and not args.quiet_tokens:
            label = "thinking" if event.token.kind == pb.CoordinatorToken.KIND_THINKING else "answer"
            if label != kind_now:
                print(f"\n--- coordinator {label} ---", file=sys.stderr)
                kind_now = label
            print(event.token.text, end="", file=sys.stderr, flush=True)
        elif kind == "plan":
            planner = pb.ComposePlan.Planner.Name(event.plan.planner).removeprefix("PLANNER_").lower()
            reason = f" ({event.plan.fallback_reason})" if event.plan.fallback_reason else ""
            print(f"\n--- plan by {planner}{reason} ---\n{event.plan.plan_json}", file=sys.stderr)
        elif kind == "step":
            st = event.step
            state = pb.ComposeStep.State.Name(st.state).removeprefix("STATE_").lower()
            if st.state == pb.ComposeStep.STATE_PROGRESS:
                print(f"\r  {st.step_id}: {_bar(st.done, st.total)}", end="", file=sys.stderr, flush=True)
            else:
                detail = st.error or st.summary_json
                print(f"\n  {st.step_id} ({st.step_type}) {state} {detail[:200]}", file=sys.stderr)
        elif kind == "audio":
            chunks.append(event.audio.wav_data)
        elif kind == "summary":
            w = event.summary
            if chunks:
                with open(args.out, "wb") as f:
                    f.write(b"".join(chunks))
            print(json.dumps({"workflow_id": w.workflow_id, "state": pb.Workflow.State.Name(w.state),
                              "planner": w.planner, "fallback_reason": w.fallback_reason,
                              "audio_seconds": round(w.audio_seconds, 2), "pattern_ids": list(w.pattern_ids),
                              "out": args.out if chunks else None}, indent=2))
    return 0


def run(args: argparse.Namespace, client: Client) -> int:
    if args.command == "analyze":
        result = client.analyze(args.wav, store=args.store, tags=_tags(args.tag), include_features=args.features)
        out = {"request_id": result.request_id, "frames": result.frames,
               "duration_seconds": round(result.duration_seconds, 3), "embedding_dim": len(result.embedding),
               "embedding_head": [round(float(x), 5) for x in result.embedding[:4]]}
        if result.pattern_id:
            out.update(pattern_id=result.pattern_id, tags=result.tags)
        if result.features is not None:
            out["features_shape"] = list(result.features.shape)
        print(json.dumps(out, indent=2))
    elif args.command == "generate":
        return _generate(args, client)
    elif args.command == "compose":
        return _compose(args, client)
    elif args.command == "workflows":
        if args.workflow_id:
            print(MessageToJson(client.get_workflow(args.workflow_id)))
        else:
            for w in client.list_workflows():
                print(f"{w.workflow_id}  {pb.Workflow.State.Name(w.state):18} {w.planner:11} {w.request[:60]}")
    elif args.command == "clusters":
        for c in client.clusters():
            print(f"{c.size:4}  {c.label:40} cohesion={c.cohesion:.2f} rating={c.mean_rating:.1f}")
    elif args.command == "rate":
        r = client.rate(args.pattern_id, args.rating, args.comment)
        print(f"{r.pattern_id}: mean {r.mean_rating:.2f} over {r.rating_count} rating(s)")
    elif args.command == "search":
        if args.like:
            emb = client.analyze(args.like).embedding
            matches = client.search(embedding=emb, top_k=args.top_k, tag_filter=_tags(args.tag))
        else:
            matches = client.search(pattern_id=args.pattern_id, top_k=args.top_k, tag_filter=_tags(args.tag))
        print(json.dumps([{"score": round(m.score, 4), **_pattern_dict(m.pattern)} for m in matches], indent=2))
    elif args.command == "patterns":
        if args.action == "list":
            items = []
            for p in client.list_patterns(tag_filter=_tags(args.tag)):
                items.append(_pattern_dict(p))
                if len(items) >= args.limit:
                    break
            print(json.dumps(items, indent=2))
        elif args.action == "get":
            print(json.dumps(_pattern_dict(client.get_pattern(args.pattern_id)), indent=2))
        else:
            client.delete_pattern(args.pattern_id)
            print(f"deleted {args.pattern_id}")
    elif args.command == "health":
        status = client.health(args.service)
        print(status)
        return 0 if status == "SERVING" else EXIT_ERROR
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with Client(args.target, timeout_s=args.timeout) as client:
            return run(args, client)
    except GrymError as err:
        print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
