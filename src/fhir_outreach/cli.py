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
import time
from typing import Any

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
    print(f"fhir-outreach {__version__}: FHIR API on {settings.fhir_base} (store {settings.store}, "
          f"{settings.processes} process{'es' if settings.processes > 1 else ''})", flush=True)
    if settings.processes == 1:
        uvicorn.run(create_app(settings, tune_gc=True), host=settings.host, port=settings.port, log_level=settings.log_level,
                    access_log=False)
        return 0
    # Several processes: each one builds the app from the same settings, passed on through the environment.
    os.environ[ENV_PREFIX + "HOST"], os.environ[ENV_PREFIX + "PORT"] = settings.host, str(settings.port)
    if args.settings:
        os.environ[ENV_PREFIX + "SETTINGS_FILE"] = args.settings
    uvicorn.run("fhir_outreach.app:app_from_environment", factory=True, workers=settings.processes,
                host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
    return 0


def _loop_factory() -> Any:
    """uvloop where it is installed (about 20% more work per CPU second for the worker, measured in
    bench/bench_channels.py), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_worker(args: argparse.Namespace) -> int:
    from .app import make_store
    from .work.worker import run_worker

    settings = _settings(args)
    _logging(settings)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run_worker(settings, make_store(settings)))
    except StoreUnavailable as exc:
        print(f"fhir-outreach worker: {exc.diagnostics}", file=sys.stderr)
        return 1
    return 0


async def _with_intake(settings: Settings, fn: Any) -> Any:
    """Open the store and an intake service (no background loop), run ``fn(service)``, close."""
    from .app import make_store
    from .intake.service import IntakeService

    store = make_store(settings)
    await store.open()
    service = IntakeService(settings, store)
    try:
        return await fn(service)
    finally:
        await service.aclose()
        await store.close()


def cmd_subscriptions_sync(args: argparse.Namespace) -> int:
    from .intake.provisioning import Provisioner

    settings = _settings(args)
    _logging(settings)
    if not settings.sources:
        print("fhir-outreach: no source servers configured (FHIR_OUTREACH_SOURCES)", file=sys.stderr)
        return 2

    async def run(service: Any) -> list[Any]:
        return await Provisioner(service.store, service.hooks, service.sources).sync(settings.sources)

    actions = asyncio.run(_with_intake(settings, run))
    if not actions:
        print("no active journey needs a trigger: nothing to provision")
    for a in actions:
        print(f"{a.source:<12} {a.trigger:<36} {a.action:<11} {a.mode:<9} {a.remote_id or '-':<38} {a.detail}")
    return 1 if any(a.action == "failed" for a in actions) else 0


def cmd_inbox(args: argparse.Namespace) -> int:
    from .intake.inbox import INBOX, summary

    settings = _settings(args)

    async def run(service: Any) -> None:
        store = service.store
        if args.inbox_command == "counts":
            for kind in (INBOX, "event", "recovery"):
                for (group, state), n in sorted((await store.count_records(kind)).items()):
                    print(f"{kind:<9} {group or '-':<12} {state:<11} {n}")
            return
        if args.inbox_command == "process":
            await service.drain(rounds=10_000)
            print("inbox processed")
            return
        records = await store.list_records(INBOX, state=args.state, group=args.source, limit=args.limit)
        for rec in records:
            item = summary(rec)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(item["received"] or 0))
            path = "/".join(item["path"] or [])
            print(f"{when} {item['id']} {item['state']:<9} {item['source']:<12} {item['method']:<6} "
                  f"/{path:<30} {item['reason'] or ''}")

    asyncio.run(_with_intake(settings, run))
    return 0


def cmd_journey(args: argparse.Namespace) -> int:
    from .journeys.commands import COMMANDS, NO_STORE

    settings = None if args.journey_command in NO_STORE else _settings(args)
    return COMMANDS[args.journey_command](args, settings)


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
    subs = sub.add_parser("subscriptions", help="source-server Subscriptions")
    subs_sub = subs.add_subparsers(dest="subscriptions_command", required=True)
    sync = subs_sub.add_parser("sync", help="create or reconcile the Subscriptions the active journeys need")
    sync.set_defaults(func=cmd_subscriptions_sync)
    inbox = sub.add_parser("inbox", help="the intake inbox (deliveries as received)")
    inbox_sub = inbox.add_subparsers(dest="inbox_command", required=True)
    ls = inbox_sub.add_parser("ls", help="list deliveries, newest first")
    ls.add_argument("--state", choices=["pending", "done", "rejected"], help="only this state")
    ls.add_argument("--source", help="only this source")
    ls.add_argument("--limit", type=int, default=50)
    inbox_sub.add_parser("counts", help="counts per kind, source and state")
    inbox_sub.add_parser("process", help="process every pending delivery now, then exit")
    for p in (ls, *inbox_sub.choices.values()):
        p.set_defaults(func=cmd_inbox)
    from .journeys.commands import add_parser

    add_parser(sub, cmd_journey)
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
