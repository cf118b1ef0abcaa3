"""``fhir-outreach journey ...``: validate, load, export, list, activate/retire, pause/resume/stop, runs,
why and simulate. Commands that need the store open it from the settings; ``validate`` and ``simulate``
need nothing but files."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import FhirError, InvalidJourney
from ..settings import Settings
from ..store import Store
from . import catalog
from .catalog import resolve_url, topic_names
from .definition import lint, parse_journey
from .explain import render, why
from .files import dump, read_file
from .runner import RUN
from .simulate import simulate


def _problems(exc: InvalidJourney) -> str:
    return "\n".join(f"  - {where}: {why_}" for where, why_ in exc.problems) or f"  - {exc.diagnostics}"


def _with_store(settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    from ..app import make_store

    async def run() -> int:
        store = make_store(settings)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def cmd_validate(args: argparse.Namespace, settings: Settings | None) -> int:
    failed = 0
    for path in args.files:
        try:
            plan, templates = read_file(path)
            tmap = {f"{t.get('url')}|{t.get('version')}": t for t in templates} | {str(t.get("url")): t for t in templates}
            j = parse_journey(plan, tmap, known_topics=topic_names())
        except InvalidJourney as exc:
            failed += 1
            print(f"{path}: INVALID\n{_problems(exc)}")
            continue
        print(f"{path}: ok — {j.canonical} ({j.status}), {len(j.steps)} steps, {len(j.templates)} templates")
        for warning in lint(j):
            print(f"  warning: {warning}")
    return 1 if failed else 0


def cmd_compile(args: argparse.Namespace, settings: Settings | None) -> int:
    """Write each YAML journey's FHIR JSON Bundle beside it (``name.yaml`` → ``name.json``)."""
    failed = 0
    for path in args.files:
        try:
            plan, templates = read_file(path)
            parse_journey(plan, {f"{t.get('url')}|{t.get('version')}": t for t in templates},
                          known_topics=topic_names())
        except InvalidJourney as exc:
            failed += 1
            print(f"{path}: INVALID\n{_problems(exc)}")
            continue
        out = Path(path).with_suffix(".json")
        out.write_text(dump(plan, templates, "json"))
        print(f"{path} -> {out}")
    return 1 if failed else 0


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        failed = 0
        for path in args.files:
            try:
                plan, templates = read_file(path)
                if args.activate:
                    plan = {**plan, "status": "active"}
                j, report = await catalog.load(store, plan, templates, base_url=settings.fhir_base)
            except FhirError as exc:
                failed += 1
                print(f"{path}: NOT LOADED\n" + (_problems(exc) if isinstance(exc, InvalidJourney)
                                               else f"  - {exc.diagnostics}"))
                continue
            print(f"{path}: {j.canonical} ({plan.get('status')})")
            for line in report:
                print(f"  {line}")
        return 1 if failed else 0

    return _with_store(settings, run)


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        found = await catalog.find_canonical(store, "PlanDefinition", resolve_url(args.journey), args.version)
        if not found:
            print(f"no journey {resolve_url(args.journey)}", file=sys.stderr)
            return 1
        plan = found[0]
        templates = list((await catalog.templates_for(store, plan)).values())
        sys.stdout.write(dump(plan, templates, args.format))
        return 0

    return _with_store(settings, run)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        counts = await store.count_records(RUN)
        for plan in sorted(await catalog.journeys(store), key=lambda p: (p.get("url"), p.get("version"))):
            canonical = f"{plan.get('url')}|{plan.get('version')}"
            control = await store.get_record(catalog.CONTROL, str(plan.get("url")))
            runs = {state: n for (group, state), n in counts.items() if group == canonical}
            print(f"{canonical:<70} {plan.get('status'):<8} {control.state if control else 'running':<8} "
                  + " ".join(f"{k}={v}" for k, v in sorted(runs.items())))
        return 0

    return _with_store(settings, run)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        url = resolve_url(args.journey)
        try:
            if args.journey_command in ("activate", "retire"):
                for line in await catalog.set_status(store, url, args.version,
                                                     "active" if args.journey_command == "activate" else "retired"):
                    print(line)
            else:
                state = {"pause": "paused", "resume": "running", "stop": "stopped"}[args.journey_command]
                print(f"{url}: {await catalog.set_control(store, url, state)}")
        except InvalidJourney as exc:
            print(_problems(exc), file=sys.stderr)
            return 1
        return 0

    return _with_store(settings, run)


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        group = None
        if args.journey:
            found = await catalog.find_canonical(store, "PlanDefinition", resolve_url(args.journey), args.version)
            group = f"{found[0]['url']}|{found[0]['version']}" if found else "-"
        for rec in await store.list_records(RUN, state=args.state, group=group, limit=args.limit):
            d = rec.data
            print(f"{rec.key}  {rec.state:<8} {d.get('status'):<9} {d.get('patient'):<30} {d.get('canonical')}  "
                  f"at {d.get('step')}")
        return 0

    return _with_store(settings, run)


def cmd_why(args: argparse.Namespace, settings: Settings) -> int:
    async def run(store: Store) -> int:
        try:
            w = await why(store, args.run)
        except FhirError as exc:
            print(exc.diagnostics, file=sys.stderr)
            return 1
        sys.stdout.write(json.dumps(w, indent=2) + "\n" if args.json else render(w))
        return 0

    return _with_store(settings, run)


def cmd_simulate(args: argparse.Namespace, settings: Settings | None) -> int:
    try:
        plan, templates = read_file(args.journey)
        events = Path(args.events).read_text()
        sys.stdout.write(asyncio.run(simulate(plan, templates, events, horizon_days=args.horizon_days)))
    except InvalidJourney as exc:
        print(f"cannot simulate:\n{_problems(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


NO_STORE = {"validate", "simulate", "compile"}


def add_parser(sub: Any, dispatch: Callable[[argparse.Namespace], int]) -> None:
    journey = sub.add_parser("journey", help="journeys: validate, load, export, list, runs, why, simulate...")
    jsub = journey.add_subparsers(dest="journey_command", required=True)
    p = jsub.add_parser("validate", help="check journey files (YAML or FHIR JSON) without a store")
    p.add_argument("files", nargs="+")
    p = jsub.add_parser("compile", help="write each YAML journey's FHIR JSON Bundle beside it")
    p.add_argument("files", nargs="+")
    p = jsub.add_parser("load", help="check and store journey files with their templates")
    p.add_argument("files", nargs="+")
    p.add_argument("--activate", action="store_true", help="store them with status active")
    p = jsub.add_parser("export", help="print a stored journey as YAML or a FHIR JSON Bundle")
    p.add_argument("journey", help="name (e.g. patient-discharge) or canonical url")
    p.add_argument("--version")
    p.add_argument("--format", choices=["yaml", "json"], default="yaml")
    jsub.add_parser("list", help="stored journeys with status, control state and run counts")
    for name, text in (("activate", "set status active (new runs start)"), ("retire", "set status retired"),
                       ("pause", "hold new runs and running ones"), ("resume", "undo pause"),
                       ("stop", "end every run of every version (stopped) and start none")):
        p = jsub.add_parser(name, help=text)
        p.add_argument("journey")
        p.add_argument("--version")
    p = jsub.add_parser("runs", help="list runs, newest first")
    p.add_argument("--journey")
    p.add_argument("--version")
    p.add_argument("--state", choices=["pending", "waiting", "awaiting", "held", "done"])
    p.add_argument("--limit", type=int, default=50)
    p = jsub.add_parser("why", help="the path a run took, with condition values and evidence")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p = jsub.add_parser("simulate", help="run a journey against recorded events on a virtual clock")
    p.add_argument("journey", help="journey file (YAML or FHIR JSON)")
    p.add_argument("--events", required=True, help="NDJSON file of {at, resource} lines")
    p.add_argument("--horizon-days", type=float, default=800.0)
    for p in jsub.choices.values():
        p.set_defaults(func=dispatch)


COMMANDS: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "validate": cmd_validate, "compile": cmd_compile, "load": cmd_load, "export": cmd_export, "list": cmd_list, "activate": cmd_status,
    "retire": cmd_status, "pause": cmd_status, "resume": cmd_status, "stop": cmd_status, "runs": cmd_runs,
    "why": cmd_why, "simulate": cmd_simulate}
