"""``grym-synth``: run the orchestrator (``serve``) or build a model repository (``export``).

Flags map one-to-one onto :class:`grym_synth.settings.Settings` fields (``--data-dir`` -> ``data_dir``), so the
environment (``GRYM_DATA_DIR``) and the command line configure the same object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from grym_synth import __version__
from grym_synth.core import logs
from grym_synth.settings import Settings

log = logging.getLogger("grym_synth")

EXPORT_FIELDS = ("data_dir", "profile", "weights_dir", "audioldm_weights_dir", "coordinator_checkpoint",
                 "coordinator_llm", "seed")


def _flag_kwargs(annotation: Any) -> dict[str, Any]:
    """argparse type/choices for a Settings annotation (``int``, ``Path | None``, ``Literal[...]``...)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        return {"choices": list(get_args(annotation))}
    if args and get_origin(annotation) is not Literal:
        return _flag_kwargs(args[0])
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation if annotation in (int, float, Path) else str}


def _add_settings_flags(parser: argparse.ArgumentParser, fields: tuple[str, ...] | None = None) -> None:
    """One flag per Settings field (``data_dir`` -> ``--data-dir``), documented by the field's description."""
    for name, info in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=info.description,
                            **_flag_kwargs(info.annotation))


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grym-synth", description=__doc__)
    parser.add_argument("--version", action="version", version=f"grym-synth {__version__}")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start Triton (embedded unless --triton-url), Milvus and the gRPC API")
    _add_settings_flags(serve)
    serve.add_argument("--port-file", type=Path, help="write the bound gRPC and metrics ports here (for scripts)")

    export = sub.add_parser("export", help="build the Triton model repository for a profile")
    _add_settings_flags(export, EXPORT_FIELDS)
    export.add_argument("--output", type=Path, help="repository directory (default: DATA_DIR/model_repository/PROFILE)")
    export.add_argument("--models", nargs="*", help="models to build (default: the ones the orchestrator serves)")
    export.add_argument("--force", action="store_true", help="rebuild even if the repository is up to date")
    return parser


async def _serve(settings: Settings, port_file: Path | None) -> int:
    from grym_synth.app import App

    app = App(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    start = asyncio.create_task(app.start())
    done, _ = await asyncio.wait({start, asyncio.create_task(stop_requested.wait())},
                                 return_when=asyncio.FIRST_COMPLETED)
    if start in done and start.exception() is None:
        if port_file:
            port_file.write_text(f"{app.port} {app.metrics_port}\n")
        _announce(app.endpoints(), settings.ports_path)
        await stop_requested.wait()
        settings.ports_path.unlink(missing_ok=True)
        log.info("signal received: draining for up to %.0fs", settings.grace_period_s)
        code = 0
    else:
        if not start.done():
            start.cancel()
        exc = start.exception() if start.done() and not start.cancelled() else None
        if exc:
            log.error("start-up failed: %s", exc)
        code = 1 if exc else 0
    await app.stop()
    return code


def _announce(endpoints: dict[str, Any], ports_path: Path) -> None:
    """Say where everything listens (stdout) and write it as JSON to the ports file, so that scripts (e.g. a
    perf_analyzer command line, docs/perf_analyzer.md) can find the embedded Triton's randomly chosen ports."""
    try:
        ports_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ports_path.with_name(ports_path.name + ".tmp")
        tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
        tmp.replace(ports_path)  # readers never see half a file
    except OSError as exc:  # the server runs fine without it: say so, do not stop
        log.warning("cannot write the ports file %s: %s", ports_path, exc.strerror)
    e = endpoints
    triton = f"triton gRPC {e['triton_grpc_url']}"
    if e["triton_metrics_url"]:
        triton += f", triton metrics {e['triton_metrics_url']}"
    print(f"grym-synth ready on {e['host']}:{e['grpc_port']} (metrics :{e['metrics_port']}; {triton}; "
          f"ports in {ports_path})", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, json_logs=not args.plain_logs)
    if getattr(args, "auth_token", None):
        log.warning("--auth-token is visible to every local user (ps, /proc/<pid>/cmdline); use --auth-token-file "
                    "or the GRYM_AUTH_TOKEN environment variable instead")
    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # pydantic's ValidationError is one: say what is wrong, without a traceback
        errors = getattr(exc, "errors", None)
        # Never the inputs: they may hold the token.
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                           for e in errors(include_url=False, include_input=False)) if errors else str(exc)
        log.error("invalid settings: %s", detail)
        return 2
    if args.command == "serve":
        return asyncio.run(_serve(settings, args.port_file))
    from grym_synth.inference.export.repository import build_repository, default_models

    out = args.output or settings.repository_dir
    manifest = build_repository(settings.profile, out, weights=settings.model_weights, seed=settings.seed,
                                models=args.models or default_models(), force=args.force)
    print(f"model repository for profile {settings.profile}: {out} ({', '.join(manifest['models'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
