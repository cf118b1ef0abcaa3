"""The ``fhir-outreach`` command: ``serve`` (the FHIR API) and ``worker`` (background work).

Settings come from ``FHIR_OUTREACH_*`` variables and an optional TOML file (``--settings``). A bad setting
prints one line naming it and exits with status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from . import __version__
from .errors import SettingsError, StoreUnavailable
from .settings import ENV_PREFIX, Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, object] = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None):
        overrides["port"] = args.port
    if not args.settings:
        return load_settings(**overrides)
    name = ENV_PREFIX + "SETTINGS_FILE"
    before = os.environ.get(name)
    os.environ[name] = args.settings  # read by the settings file source; restored right after
    try:
        return load_settings(**overrides)
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    settings = _settings(args)
    _logging(settings)
    app = create_app(settings)
    print(f"fhir-outreach {__version__}: FHIR API on {settings.fhir_base} (store {settings.store})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .app import _make_store
    from .work.worker import run_worker

    settings = _settings(args)
    _logging(settings)
    try:
        asyncio.run(run_worker(settings, _make_store(settings)))
    except StoreUnavailable as exc:
        print(f"fhir-outreach worker: {exc.diagnostics}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fhir-outreach", description="FHIR-native patient-outreach engine")
    parser.add_argument("--version", action="version", version=f"fhir-outreach {__version__}")
    parser.add_argument("--settings", help="TOML settings file (same keys as the variables, without prefix)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the FHIR API (on the embedded SQLite store by default)")
    serve.add_argument("--host", help="listen address (FHIR_OUTREACH_HOST)")
    serve.add_argument("--port", type=int, help="listen port (FHIR_OUTREACH_PORT)")
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="run a background worker against the configured store")
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"fhir-outreach: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
