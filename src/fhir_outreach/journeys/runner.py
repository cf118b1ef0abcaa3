"""The journey runtime: events in, runs carried over days and weeks, outcomes out.

One ``Engine`` per process (``serve``'s in-process worker and every ``fhir-outreach worker``); all state is in
the store, so any number run side by side. Each round it
1. claims pending ``event`` records (from intake, or from changes made through our own FHIR API): hands each
   to the runs awaiting an engagement of that patient (``waiter`` records), ends runs whose exit criteria it
   meets, and starts the journeys it triggers (``member`` records apply re-entry and the binding key);
2. claims due ``run`` records under a lease and executes steps until the run waits, awaits, or ends — a run
   record is its own durable timer (``due``), so a million pending waits cost rows, not memory;
3. fires due periodic triggers (``tick`` records) and applies journey stop requests.
Side effects carry deterministic ids, so a worker killed at any point and a retry by another worker never
produce a second Communication or Task. A run is also written as a ``RequestGroup`` at every pause point.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import orjson

from ..errors import Conflict, FhirError, InvalidJourney, NotFound, PreconditionFailed
from ..fhir.client import SourceClients, SourceError, SourceUnavailable
from ..fhir.fhirpath import FhirPathError, evaluate, evaluate_boolean
from ..fhir.search import parse_query
from ..intake.processor import EVENT
from ..intake.topics import Topic, load_topics
from ..store import Store, Write
from ..store.base import MUST_NOT_EXIST, Record, prepare
from ..work.clock import Clock, SystemClock, fhir_instant, to_datetime
from . import steps
from .catalog import CONTROL, Catalog
from .definition import RUN_SYSTEM, STEP_SYSTEM, Input, Journey, Step, add_duration
from .matcher import engaged, match, patient_of

log = logging.getLogger("fhir_outreach.journeys")

RUN = "run"
WAITER = "waiter"
MEMBER = "member"
TICK = "tick"
DELIVERY = "delivery"  # a non-portal message handed to the channel layer
HELD = "held"  # run state while its journey is paused (not claimable)
RUN_REVISION_URL = "http://fhir-outreach.org/StructureDefinition/run-revision"
MAX_STEPS_PER_ROUND = 200
Writeback = Callable[[Sequence[dict[str, Any]]], Awaitable[None]]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RunContext:
    """What a step sees: the run's facts, its variables, and the stores and sources to read from."""

    def __init__(self, engine: Engine, rec: Record, journey: Journey) -> None:
        self.engine = engine
        self.store = engine.store
        self.rec = rec
        self.data = rec.data
        self.journey = journey
        self.run_id = rec.key
        self.patient_ref = str(rec.data["patient"])
        self.trigger_ref = rec.data.get("focus")
        self.base_url = engine.base_url
        self.now = engine.clock.now()
        self._patient: dict[str, Any] | None = None
        self._patient_loaded = False
        self._inputs: dict[str, list[dict[str, Any]]] = {}
        self._evidence: list[str] = []
        self.notes: list[str] = []
        self.written: list[str] = []

    async def ensure_lease(self) -> None:
        await self.engine.ensure_lease(self.rec)

    async def portal_block(self, comm: dict[str, Any]) -> tuple[str, str] | None:
        """(reason, detail) when consent or an opt-out forbids this portal message, else None."""
        if self.engine.portal_guard is None:
            return None
        return await self.engine.portal_guard(comm, await self.patient(), self.now)

    # --- facts ---------------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)

    def produced(self, refs: Sequence[str]) -> None:
        self.written += list(refs)

    def take_evidence(self) -> list[str]:
        out, self._evidence = self._evidence, []
        return out

    def output_of(self, step_id: str) -> str | None:
        """The most recent resource a step produced in this run (what an await refers to)."""
        for entry in reversed(self.data.get("path") or []):
            if entry.get("step") == step_id and entry.get("outputs"):
                return str(entry["outputs"][0])
        return None

    # --- reads ---------------------------------------------------------------------------------------

    def _client(self) -> Any:
        source = self.data.get("source")
        return self.engine.sources.get(source) if self.engine.sources and source and \
            source in self.engine.sources.names() else None

    async def read(self, rtype: str, rid: str) -> dict[str, Any] | None:
        client = self._client()
        if client is not None:
            return await client.read(rtype, rid)  # type: ignore[no-any-return]
        stored = await self.store.read(rtype, rid)
        return stored.resource if stored and not stored.deleted else None

    async def patient(self) -> dict[str, Any] | None:
        if not self._patient_loaded:
            rtype, rid = self.patient_ref.split("/")
            self._patient = await self.read(rtype, rid)
            self._patient_loaded = True
        return self._patient

    async def input(self, req: Input) -> list[dict[str, Any]]:
        if req.name in self._inputs:
            return self._inputs[req.name]
        pid = self.patient_ref.split("/")[1]
        params = [("patient", pid)]
        if req.codes:
            params.append((req.path, ",".join(req.codes)))
        client = self._client()
        if client is not None:
            found = await client.search(req.type, params, limit=1000)
        else:
            query = parse_query(req.type, params, max_count=1000)
            query.count = 1000
            found = [r.resource for r in (await self.store.search(query)).resources if r.resource]
        self._inputs[req.name] = found
        self._evidence += [f"{r.get('resourceType')}/{r.get('id')}" for r in found]
        return found

    async def variables(self, expression: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        env: dict[str, Any] = {
            "current": self.data.get("current"), "previous": self.data.get("previous"),
            "event": self.data.get("event"), "now": fhir_instant(self.now), "today": fhir_instant(self.now)[:10],
            "run": {"id": self.run_id, "journey": self.journey.canonical, "outputs": list(self.data.get("outputs") or []),
                    "step": self.data.get("step"), "binding": self.data.get("binding")},
        }
        if "%patient" in expression:
            env["patient"] = await self.patient()
        for name, req in self.journey.inputs.items():
            if f"%{name}" in expression:
                env[name] = await self.input(req)
        env.update(extra or {})
        return env

    async def evaluate(self, expression: str, *, extra: Mapping[str, Any] | None = None) -> list[Any]:
        env = await self.variables(expression, extra)
        return evaluate(expression, self.data.get("current") or {}, env)

    async def boolean(self, expression: str) -> bool | None:
        env = await self.variables(expression)
        return evaluate_boolean(expression, self.data.get("current") or {}, env)

    # --- writes --------------------------------------------------------------------------------------

    async def read_for_update(self, rtype: str, rid: str) -> tuple[dict[str, Any], str | None]:
        client = self._client()
        if client is not None:
            res = await client.read(rtype, rid)
            if res is None:
                raise NotFound(f"{rtype}/{rid} is not on source {self.data.get('source')}")
            return res, str((res.get("meta") or {}).get("versionId") or "") or None
        stored = await self.store.read(rtype, rid)
        if stored is None or stored.deleted or stored.resource is None:
            raise NotFound(f"{rtype}/{rid} does not exist")
        return dict(stored.resource), str(stored.version)

    async def write_update(self, resource: dict[str, Any], version: str | None) -> None:
        client = self._client()
        if client is not None:
            await client.update(resource, if_match=f'W/"{version}"' if version else None)
            return
        await self.store.commit([prepare(Write(resource["resourceType"], resource["id"], resource,
                                               expect=int(version) if version else None), self.base_url)],
                                now=to_datetime(self.now))

    async def hand_to_channel(self, comm: dict[str, Any], medium: str) -> None:
        if medium == "portal":  # complete on its own: the portal marks it read through the FHIR API
            return
        await self.store.add_record(Record(DELIVERY, f"Communication/{comm['id']}", group=medium, due=self.now,
                                           data={"communication": f"Communication/{comm['id']}",
                                                 "medium": medium, "run": self.run_id, "created": self.now,
                                                 "source": self.data.get("source")}), now=self.now)


class Engine:
    def __init__(self, store: Store, *, clock: Clock | None = None, sources: SourceClients | None = None,
                 owner: str | None = None, lease_seconds: float = 60.0, base_url: str | None = None,
                 writeback: Writeback | None = None, catalog: Catalog | None = None,
                 topics: Mapping[str, Topic] | None = None, periodic_source: str | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()
        self.sources = sources
        self.owner = owner or worker_id()
        self.lease_seconds = lease_seconds
        self.base_url = base_url
        self.writeback = writeback
        self.catalog = catalog or Catalog(store)
        self.topics = dict(topics) if topics is not None else load_topics()
        self.periodic_source = periodic_source
        # (communication, patient, now) -> (reason, detail) when a portal message may not be written
        self.portal_guard: Callable[[dict[str, Any], dict[str, Any] | None, float],
                                    Awaitable[tuple[str, str] | None]] | None = None
        self.steps_executed = 0

    # --- the loop ------------------------------------------------------------------------------------

    async def run_once(self, limit: int = 50) -> int:
        handled = await self.process_events(limit)
        handled += await self.advance_runs(limit)
        handled += await self.fire_ticks()
        handled += await self.apply_stops()
        return handled

    async def drain(self, rounds: int = 1000) -> int:
        total = 0
        for _ in range(rounds):
            n = await self.run_once()
            total += n
            if not n:
                break
        return total

    # --- events --------------------------------------------------------------------------------------

    async def process_events(self, limit: int) -> int:
        now = self.clock.now()
        claimed = await self.store.claim_records(EVENT, owner=self.owner, now=now, lease_seconds=self.lease_seconds,
                                                 limit=limit)
        # Claimed items are independent (each is leased; shared records are compare-and-set), so they run
        # concurrently: the store then commits their writes together instead of one round trip each.
        await asyncio.gather(*(self._one_event(rec) for rec in claimed))
        return len(claimed)

    async def _one_event(self, rec: Record) -> None:
        try:
            notes = await self.handle_event(rec)
        except Exception as exc:  # retried later; never stops the other events
            if not isinstance(exc, SourceUnavailable | SourceError | FhirError):
                log.exception("event %s failed unexpectedly", rec.key)
            rec.attempts += 1
            rec.due = self.clock.now() + min(300.0, 2.0 ** rec.attempts)
            rec.lease_owner, rec.lease_until = None, 0.0
            rec.data = {**rec.data, "journey_error": getattr(exc, "diagnostics", None) or f"{type(exc).__name__}: {exc}"}
            await self.store.save_record(rec, now=self.clock.now())
            return
        rec.state = "done"
        rec.lease_owner, rec.lease_until = None, 0.0
        rec.data = {**rec.data, "journeys": notes}
        await self.store.save_record(rec, now=self.clock.now())

    async def handle_event(self, rec: Record) -> dict[str, Any]:
        ev = rec.data
        patient = ev.get("patient") or patient_of(ev.get("resource"), ev.get("focus"))
        notes: dict[str, Any] = {"patient": patient}
        if patient:
            notes["resumed"] = await self._deliver(rec, patient)
            notes["exited"] = await self._exits(ev, patient)
        matches, why = match(ev, await self.catalog.active(), self.topics)
        notes["not_matched"] = why
        started = []
        for m in matches:
            if patient is None:
                why[m.journey.canonical] = "the change names no patient"
                continue
            if await self._paused(m.journey.url):
                why[m.journey.canonical] = "journey paused"
                continue
            result = await self.enrol(m.journey, patient, ev, rec.key)
            if result.startswith("run "):
                started.append(result[4:])
            else:
                why[m.journey.canonical] = result
        notes["started"] = started
        for canonical, reason in why.items():
            log.debug("event %s: journey %s not started: %s", rec.key, canonical, reason)
        return notes

    async def enrol(self, journey: Journey, patient: str, ev: Mapping[str, Any], event_key: str) -> str:
        """Start a run unless re-entry or the binding key forbid it; idempotent per event."""
        now = self.clock.now()
        binding = ""
        if journey.binding:
            try:
                value = evaluate(journey.binding, ev.get("resource") or {},
                                 {"current": ev.get("resource"), "previous": ev.get("previous")})
            except FhirPathError as exc:
                return f"binding key failed: {exc.diagnostics}"
            binding = str(value[0]) if value else ""
        key = f"{journey.url}|{patient}|{binding}"
        for _ in range(5):
            member = await self.store.get_record(MEMBER, key)
            if member is None:
                entry = 1
                member = Record(MEMBER, key, state="active", group=patient, data={
                    "journey": journey.url, "entries": 1, "event": event_key, "started": now,
                    "run": steps.derived_id(f"run|{journey.canonical}|{patient}|{binding}|1")})
                if not await self.store.add_record(member, now=now):
                    continue
            elif member.data.get("event") == event_key:
                entry = int(member.data["entries"])  # this event enrolled it before a crash: finish that
            else:
                if journey.reentry == "never":
                    return "already enrolled (re-entry: never)"
                if member.state == "active" and not await self._member_run_over(member):
                    return f"run {member.data.get('run')} is still active for this patient and binding key"
                if journey.reentry == "after" and journey.reentry_interval:
                    allowed = add_duration(to_datetime(float(member.data.get("started") or 0)),
                                           journey.reentry_interval).timestamp()
                    if now < allowed:
                        return f"re-entry not before {fhir_instant(allowed)}"
                entry = int(member.data.get("entries") or 0) + 1
                member.state = "active"
                member.data = {**member.data, "entries": entry, "event": event_key, "started": now,
                               "run": steps.derived_id(f"run|{journey.canonical}|{patient}|{binding}|{entry}")}
                if not await self.store.save_record(member, now=now):
                    continue
            run_id = steps.derived_id(f"run|{journey.canonical}|{patient}|{binding}|{entry}")
            if member.data.get("run") != run_id:
                member.data = {**member.data, "run": run_id}
                if not await self.store.save_record(member, now=now):
                    continue
            await self.store.add_record(Record(RUN, run_id, state="pending", group=journey.canonical, due=now, data={
                "journey": journey.url, "version": journey.version, "canonical": journey.canonical,
                "patient": patient, "binding": binding, "member": key, "event_key": event_key,
                "source": ev.get("source"), "focus": ev.get("focus"), "interaction": ev.get("interaction"),
                "current": ev.get("resource"), "previous": ev.get("previous"), "event": None,
                "step": journey.first, "status": "active", "path": [], "outputs": [], "started": now}), now=now)
            return f"run {run_id}"
        return "enrolment kept changing under us; will retry"

    async def _member_run_over(self, member: Record) -> bool:
        """An ``active`` member whose run is over (a worker died between ending the run and the member):
        repair it here, so re-entry is not blocked forever."""
        run = await self.store.get_record(RUN, str(member.data.get("run")))
        if run is not None and run.state != "done":
            return False
        member.state = "done"
        await self.store.save_record(member, now=self.clock.now())  # if another changed it, enrol's save fails
        return True

    async def _deliver(self, rec: Record, patient: str) -> list[str]:
        resumed = []
        resource = rec.data.get("resource")
        waiters = await self.store.list_records(WAITER, group=patient, state="pending", limit=500)
        for w in waiters:
            spec = w.data
            ident = spec.get("identifier")
            if not engaged(spec, resource, identifier=ident):
                continue
            if spec.get("criteria"):
                try:
                    ok = evaluate_boolean(spec["criteria"], resource or {}, {"event": resource, "current": resource})
                except FhirPathError:
                    ok = False
                if not ok:
                    continue
            if await self._resume(w, resource, rec.key):
                resumed.append(str(spec["run"]))
        return resumed

    async def _resume(self, waiter: Record, resource: Any, event_key: str) -> bool:
        now = self.clock.now()
        for _ in range(5):
            run = await self.store.get_record(RUN, str(waiter.data["run"]))
            held = run is not None and run.state == HELD and (run.data.get("held") or {}).get("state") == "awaiting"
            stale = run is None or (run.state != "awaiting" and not held) or \
                (run.data.get("await") or {}).get("seq") != waiter.data.get("seq")
            if stale:
                waiter.state = "done"
                await self.store.save_record(waiter, now=now)
                return False
            assert run is not None
            if run.lease_until > now:  # a worker holds it (its timeout may be firing): try this event again later
                raise _Busy(f"run {run.key} is being executed")
            run.data = {**run.data, "resume": {"event": resource, "key": event_key, "at": now}}
            if held:  # the engagement is kept; the run takes it when its journey is resumed
                run.data["held"] = {**run.data["held"], "due": now}
            else:
                run.due = now
            if await self.store.save_record(run, now=now):
                waiter.state = "done"
                await self.store.save_record(waiter, now=now)
                return True
        raise _Busy(f"run {waiter.data['run']} kept changing")

    async def _exits(self, ev: Mapping[str, Any], patient: str) -> list[str]:
        exited: list[str] = []
        resource = ev.get("resource")
        if resource is None:
            return exited
        members = await self.store.list_records(MEMBER, group=patient, state="active", limit=200)
        for m in members:
            run = await self.store.get_record(RUN, str(m.data.get("run")))
            if run is None or run.state == "done":
                continue
            try:
                journey = await self.catalog.get(str(run.data["canonical"]))
            except InvalidJourney:
                continue
            if not journey.exit:
                continue
            try:
                ok = evaluate_boolean(journey.exit, resource, {"current": resource, "previous": ev.get("previous"),
                                                               "binding": run.data.get("binding"),
                                                               "trigger": run.data.get("current")})
            except FhirPathError:
                continue
            if ok and await self._stop_run(run, "exited", f"exit criteria met by {ev.get('focus')}"):
                exited.append(run.key)
        return exited

    # --- runs ----------------------------------------------------------------------------------------

    async def advance_runs(self, limit: int) -> int:
        now = self.clock.now()
        claimed = await self.store.claim_records(RUN, owner=self.owner, now=now, lease_seconds=self.lease_seconds,
                                                 limit=limit, states=("pending", "waiting", "awaiting"))
        await asyncio.gather(*(self._one_run(rec) for rec in claimed))  # leased runs are independent
        return len(claimed)

    async def _one_run(self, rec: Record) -> None:
        try:
            await self.advance(rec)
        except _Abandon as exc:
            log.warning("%s; this worker stops acting for it", exc)
        except _Retry as exc:
            await self._release(rec, exc.delay, exc.reason)
        except Exception as exc:  # never let one run stop the others
            log.exception("run %s failed unexpectedly", rec.key)
            await self._release(rec, min(600.0, 5.0 * 2 ** rec.attempts), f"{type(exc).__name__}: {exc}")

    async def _release(self, rec: Record, delay: float, reason: str) -> None:
        latest = await self.store.get_record(RUN, rec.key)
        if latest is None or latest.lease_owner != self.owner:
            return
        latest.attempts += 1
        latest.due = self.clock.now() + delay
        latest.lease_owner, latest.lease_until = None, 0.0
        latest.data = {**latest.data, "retry": reason}
        await self.store.save_record(latest, now=self.clock.now())

    async def advance(self, rec: Record) -> None:
        journey = await self.catalog.get(str(rec.data["canonical"]))
        control = await self._control(journey.url)
        if control == "stopped":
            await self._stop_run(rec, "stopped", "journey stopped", leased=True)
            return
        if control == "paused":  # park it, off the claim index, until the journey is resumed
            rec.data = {**rec.data, "held": {"state": rec.state, "due": rec.due}}
            rec.state, rec.lease_owner, rec.lease_until = HELD, None, 0.0
            await self.store.save_record(rec, now=self.clock.now())
            return
        ctx = RunContext(self, rec, journey)
        data = rec.data
        path: list[dict[str, Any]] = data.setdefault("path", [])
        step_id: str | None
        if rec.state == "awaiting":
            wait = data.get("await") or {}
            step = journey.steps[wait["step"]]
            resume = data.pop("resume", None)
            label = "event" if resume else "timeout"
            if resume:
                data["event"] = resume.get("event")
            arm = step.arm(label)
            step_id = arm.target if arm else (step.next if label == "event" else None)
            path.append(self._entry(ctx, step, len(path), steps.Outcome(
                "go", step_id, arm=label, note=(f"engagement: {resume['key']}" if resume else "timed out") +
                f" -> {step_id or 'end'}", evidence=[_ref(resume.get("event"))] if resume and resume.get("event")
                else [])))
            await self._close_waiter(rec.key, wait)
            data.pop("await", None)
        elif rec.state == "waiting":
            step_id = data.get("next")
        else:
            step_id = data.get("step")
        await self._execute(ctx, rec, journey, step_id)

    async def _close_waiter(self, run_id: str, wait: Mapping[str, Any]) -> None:
        w = await self.store.get_record(WAITER, f"{run_id}|{wait.get('seq')}")
        if w is not None and w.state != "done":
            w.state = "done"
            await self.store.save_record(w, now=self.clock.now())

    async def _execute(self, ctx: RunContext, rec: Record, journey: Journey, step_id: str | None) -> None:
        data = rec.data
        path = data["path"]
        executed = 0
        while True:
            if step_id is None:
                await self._finish(ctx, rec, journey, "completed")
                return
            step = journey.steps[step_id]
            seq = len(path)
            data["step"] = step_id
            try:
                outcome = await self._run_step(ctx, step, seq)
            except (FhirPathError, NotFound, InvalidJourney) as exc:
                error_arm = step.arm("error")
                path.append(self._entry(ctx, step, seq, steps.Outcome(
                    "go", error_arm.target if error_arm else None, arm="error" if error_arm else None,
                    note=f"error: {exc.diagnostics}", evidence=ctx.take_evidence()), error=exc.diagnostics))
                if error_arm is None:
                    await self._finish(ctx, rec, journey, "failed", reason=exc.diagnostics)
                    return
                step_id = error_arm.target
                continue
            except (SourceUnavailable, SourceError, PreconditionFailed, Conflict) as exc:
                await self._save(ctx, rec, journey)  # keep the progress made so far, then retry this step
                raise _Retry(min(600.0, 5.0 * 2 ** rec.attempts), exc.diagnostics) from exc
            executed += 1
            self.steps_executed += 1
            path.append(self._entry(ctx, step, seq, outcome))
            if outcome.outputs:
                data["outputs"] = [*data.get("outputs", []), *[o for o in outcome.outputs
                                                                if not o.startswith("Provenance/")]]
            if outcome.kind == "wait" or (outcome.kind == "go" and step.delay and outcome.go):
                until = outcome.until if outcome.kind == "wait" else \
                    add_duration(to_datetime(ctx.now), str(step.delay)).timestamp()
                data["next"] = outcome.go
                rec.state, rec.due = "waiting", float(until or ctx.now)
                await self._save(ctx, rec, journey)
                return
            if outcome.kind == "await":
                spec = dict(outcome.await_ or {})
                spec.update(seq=seq, step=step.id)
                if spec.get("target"):
                    spec["identifier"] = self._identifier_of(rec.key, data, str(spec["target"]))
                data["await"] = spec
                rec.state, rec.due = "awaiting", float(spec["until"])
                await self.store.add_record(Record(WAITER, f"{rec.key}|{seq}", group=ctx.patient_ref, due=rec.due,
                                                   data={"run": rec.key, **spec}), now=ctx.now)
                await self._save(ctx, rec, journey)
                return
            step_id = outcome.go
            if executed >= MAX_STEPS_PER_ROUND:
                rec.state, rec.due = "pending", ctx.now
                await self._save(ctx, rec, journey)
                return

    @staticmethod
    def _identifier_of(run_id: str, data: Mapping[str, Any], target: str) -> str | None:
        """Our identifier value of an output (``steps._identity``), to recognise a written-back copy."""
        for entry in data.get("path") or []:
            if target in (entry.get("outputs") or []):
                return f"{run_id}/{entry['step']}/{entry['seq']}"
        return None

    async def _run_step(self, ctx: RunContext, step: Step, seq: int) -> steps.Outcome:
        kind = step.kind
        if kind == "branch":
            return await steps.run_branch(ctx, step)
        if kind == "message":
            return await steps.run_message(ctx, step, seq)
        if kind == "task":
            return await steps.run_task(ctx, step, seq)
        if kind == "wait":
            return await steps.run_wait(ctx, step)
        if kind == "await":
            return await steps.run_await(ctx, step)
        if kind == "preference":
            return await steps.run_preference(ctx, step)
        if kind == "update":
            return await steps.run_update(ctx, step)
        return steps.Outcome("go", None, note="end")

    def _entry(self, ctx: RunContext, step: Step, seq: int, outcome: steps.Outcome, *,
               error: str | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"seq": seq, "step": step.id, "kind": step.kind, "title": step.title,
                                 "at": ctx.now, "note": outcome.note}
        if outcome.arm:
            entry["arm"] = outcome.arm
        if outcome.values:
            entry["values"] = outcome.values
        if outcome.outputs:
            entry["outputs"] = outcome.outputs
        if outcome.evidence:
            entry["evidence"] = sorted(set(outcome.evidence))
        if error:
            entry["error"] = error
        if ctx.notes:
            entry["notes"], ctx.notes = list(ctx.notes), []
        return entry

    async def _finish(self, ctx: RunContext, rec: Record, journey: Journey, status: str, *,
                      reason: str | None = None) -> None:
        data = rec.data
        data["status"] = status
        data["ended"] = ctx.now
        if reason:
            data["reason"] = reason
        if journey.goal_criteria:
            try:
                data["goal_met"] = bool(await ctx.boolean(journey.goal_criteria))
            except FhirPathError as exc:
                data["goal_met"] = None
                data["goal_error"] = exc.diagnostics
        rec.state, rec.due = "done", 0.0
        await self._save(ctx, rec, journey)
        await self._end_member(rec.key, data)

    async def _end_member(self, run_id: str, data: Mapping[str, Any]) -> None:
        member = await self.store.get_record(MEMBER, str(data.get("member")))
        if member is not None and member.state == "active" and member.data.get("run") == run_id:
            member.state = "done"
            await self.store.save_record(member, now=self.clock.now())

    async def ensure_lease(self, rec: Record) -> None:
        """Before acting for a run: once half the lease has passed, renew it with a compare-and-set; if another
        worker has taken the run meanwhile (this one paused past its lease), give the round up (``_Abandon``)
        instead of writing for a run it no longer holds. Rounds normally end in milliseconds, so this
        rarely costs a write."""
        now = self.clock.now()
        if now < rec.lease_until - self.lease_seconds / 2:
            return
        rec.lease_until = now + self.lease_seconds
        if not await self.store.save_record(rec, now=now):
            raise _Abandon(f"run {rec.key} was taken over by another worker")

    async def _save(self, ctx: RunContext, rec: Record, journey: Journey) -> None:
        """Write the RequestGroup, release the lease and store the run (compare-and-set)."""
        await self.ensure_lease(rec)
        group = request_group(rec, journey)
        written: list[dict[str, Any]] = []
        digest = hashlib.sha256(orjson.dumps(group, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
        if rec.data.get("rg_hash") != digest:  # unchanged since the last save: no new version
            stored_group = await self._write_group(rec, group, ctx.now)
            if stored_group is not None:
                written.append(stored_group)
            rec.data["rg_hash"] = digest
        if self.writeback is not None:
            outputs = []
            for ref in ctx.written:
                rtype, rid = ref.split("/")
                stored = await self.store.read(rtype, rid)
                if stored is not None and stored.resource is not None:
                    outputs.append(stored.resource)
            if written or outputs:
                await self.writeback([*written, *outputs])
        rec.lease_owner, rec.lease_until = None, 0.0
        if not await self.store.save_record(rec, now=ctx.now):
            log.warning("run %s changed while this worker held it (lease expired?); its next owner goes on", rec.key)
        ctx.written = []

    async def _write_group(self, rec: Record, group: dict[str, Any], now: float) -> dict[str, Any] | None:
        """Write the run's RequestGroup fenced by the run record's revision: it carries the revision the run
        will have once this save lands, and a group already showing a later revision is left alone, with the
        write itself conditional on the version read (so a worker that lost the run cannot roll it back)."""
        revision = rec.rev + 1
        group = {**group, "extension": [*group.get("extension", []),
                                        {"url": RUN_REVISION_URL, "valueInteger": revision}]}
        for _ in range(5):
            stored = await self.store.read("RequestGroup", rec.key)
            expect = MUST_NOT_EXIST
            if stored is not None and stored.resource is not None:
                theirs = next((e.get("valueInteger", 0) for e in stored.resource.get("extension") or []
                               if e.get("url") == RUN_REVISION_URL), 0)
                if theirs >= revision:
                    return None  # a later state of the run is already there
                expect = stored.version
            elif stored is not None:
                expect = stored.version  # deleted: write over it
            try:
                [res] = await self.store.commit([prepare(Write("RequestGroup", rec.key, group, expect=expect),
                                                         self.base_url)], now=to_datetime(now))
            except (PreconditionFailed, Conflict):
                continue  # written meanwhile: look again
            return res.stored.resource or group
        return None

    async def _stop_run(self, rec: Record, status: str, reason: str, *, leased: bool = False) -> bool:
        now = self.clock.now()
        if not leased and rec.lease_until > now:
            raise _Busy(f"run {rec.key} is being executed")
        journey = await self.catalog.get(str(rec.data["canonical"]))
        wait = rec.data.get("await")
        if wait:
            await self._close_waiter(rec.key, wait)
        rec.data = {**rec.data, "status": status, "reason": reason, "ended": now}
        rec.data.setdefault("path", []).append({"seq": len(rec.data.get("path") or []), "step": "-", "kind": status,
                                                "at": now, "note": reason})
        rec.state, rec.due = "done", 0.0
        ctx = RunContext(self, rec, journey)
        await self._save(ctx, rec, journey)
        await self._end_member(rec.key, rec.data)
        return True

    # --- control and schedules ------------------------------------------------------------------------

    async def _control(self, url: str) -> str:
        rec = await self.store.get_record(CONTROL, url)
        return rec.state if rec is not None else "running"

    async def _paused(self, url: str) -> bool:
        return await self._control(url) in ("paused", "stopped")

    async def apply_stops(self, limit: int = 100) -> int:
        """Stop every run of stopped journeys; put the runs parked while paused back once resumed."""
        handled = await self._release_held(limit)
        stops = await self.store.list_records(CONTROL, state="stopped", limit=50)
        for ctl in stops:
            for canonical in ctl.data.get("canonicals") or []:
                for state in ("pending", "waiting", "awaiting", HELD):
                    for run in await self.store.list_records(RUN, state=state, group=canonical, limit=limit):
                        try:
                            await self._stop_run(run, "stopped", "journey stopped")
                            handled += 1
                        except _Busy:
                            continue
        return handled

    async def _release_held(self, limit: int) -> int:
        handled = 0
        now = self.clock.now()
        for ctl in await self.store.list_records(CONTROL, state="running", limit=50):
            if not ctl.data.get("release"):
                continue
            found = 0
            for canonical in ctl.data.get("canonicals") or []:
                for run in await self.store.list_records(RUN, state=HELD, group=canonical, limit=limit):
                    found += 1
                    held = run.data.pop("held", None) or {"state": "pending", "due": now}
                    run.state, run.due = str(held["state"]), float(held["due"])
                    if await self.store.save_record(run, now=now):
                        handled += 1
            if not found:
                ctl.data = {k: v for k, v in ctl.data.items() if k != "release"}
                await self.store.save_record(ctl, now=now)
        return handled

    async def fire_ticks(self) -> int:
        now = self.clock.now()
        handled = 0
        for journey in await self.catalog.active():
            for i, trig in enumerate(journey.triggers):
                if trig.kind == "periodic":
                    await self.store.add_record(Record(TICK, f"{journey.canonical}|{i}", group=journey.canonical,
                                                       due=now, data={"canonical": journey.canonical, "trigger": i}),
                                                now=now)
        for tick in await self.store.claim_records(TICK, owner=self.owner, now=now, lease_seconds=self.lease_seconds,
                                                   limit=20):
            handled += 1
            try:
                journey = await self.catalog.get(str(tick.data["canonical"]))
            except InvalidJourney:
                tick.state = "done"
                await self.store.save_record(tick, now=now)
                continue
            if journey.status != "active" or await self._paused(journey.url):
                tick.due, tick.lease_owner, tick.lease_until = now + 60.0, None, 0.0
                await self.store.save_record(tick, now=now)
                continue
            trig = journey.triggers[int(tick.data["trigger"])]
            started = await self._scan(journey, trig, tick.key)
            tick.data = {**tick.data, "last": now, "started": started}
            tick.due = add_duration(to_datetime(now), str(trig.every)).timestamp()
            tick.lease_owner, tick.lease_until = None, 0.0
            await self.store.save_record(tick, now=now)
        return handled

    async def _scan(self, journey: Journey, trig: Any, tick_key: str) -> int:
        rtype, _, qs = str(trig.search).partition("?")
        params = [tuple(p.split("=", 1)) for p in qs.split("&") if "=" in p]
        source = self.periodic_source
        if source and self.sources is not None:
            found = await self.sources.get(source).search(rtype, params, limit=10000)  # type: ignore[arg-type]
        else:
            query = parse_query(rtype, params, max_count=10000)  # type: ignore[arg-type]
            query.count = 10000
            found = [r.resource for r in (await self.store.search(query)).resources if r.resource]
        now = self.clock.now()
        started = 0
        for res in found:
            if trig.condition:
                try:
                    ok = evaluate_boolean(trig.condition, res, {"current": res, "now": fhir_instant(now),
                                                                "today": fhir_instant(now)[:10]})
                except FhirPathError as exc:
                    log.warning("periodic trigger of %s: %s", journey.canonical, exc.diagnostics)
                    continue
                if not ok:
                    continue
            patient = patient_of(res)
            if patient is None:
                continue
            focus = f"{res['resourceType']}/{res['id']}"
            version = (res.get("meta") or {}).get("versionId")
            ev = {"source": source or "local", "focus": focus, "interaction": "update", "resource": res,
                  "previous": None}
            result = await self.enrol(journey, patient, ev, f"{tick_key}|{focus}|v{version}|{int(now)}")
            started += result.startswith("run ")
        return started


class _Retry(Exception):
    def __init__(self, delay: float, reason: str) -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class _Abandon(Exception):
    """This worker no longer holds the run (its lease expired and another worker took it)."""


class _Busy(FhirError):
    """A run is held by a worker right now; the event that wants to change it is retried shortly."""

    retryable = True


def _ref(resource: Any) -> str:
    if isinstance(resource, dict):
        return f"{resource.get('resourceType')}/{resource.get('id')}"
    return str(resource)


STATUS = {"active": "active", "completed": "completed", "exited": "completed", "failed": "entered-in-error",
          "stopped": "revoked"}


def request_group(rec: Record, journey: Journey) -> dict[str, Any]:
    """The run as a RequestGroup: one action per executed step, with its outcome and references."""
    data = rec.data
    status = STATUS.get(str(data.get("status")), "active")
    group: dict[str, Any] = {
        "resourceType": "RequestGroup", "id": rec.key,
        "identifier": [{"system": RUN_SYSTEM, "value": rec.key}],
        "instantiatesCanonical": [journey.canonical], "status": status, "intent": "plan",
        "subject": {"reference": data["patient"]}, "authoredOn": fhir_instant(float(data.get("started") or 0)),
        "extension": [{"url": "http://fhir-outreach.org/StructureDefinition/run-state",
                       "valueCode": str(data.get("status") or "active")}],
    }
    if data.get("focus"):
        group["reasonReference"] = [{"reference": data["focus"]}]
    if data.get("reason"):
        group["note"] = [{"text": str(data["reason"])}]
    actions = []
    for entry in data.get("path") or []:
        action: dict[str, Any] = {"id": f"s{entry['seq']}", "title": entry.get("title") or entry.get("step"),
                                  "description": entry.get("note", ""),
                                  "code": [{"coding": [{"system": STEP_SYSTEM, "code": entry.get("kind")}]}]}
        outputs = [o for o in entry.get("outputs") or [] if not str(o).startswith("Provenance/")]
        if outputs:
            action["resource"] = {"reference": outputs[0]}
        actions.append(action)
    if actions:
        group["action"] = actions
    return group
