"""``fhir-outreach journey ...`` as a real subprocess: validate, simulate (deterministic, writes nothing), and
load / list / export / runs / why against a SQLite store in a temporary directory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]

from fhir_outreach.app import create_app
from fhir_outreach.journeys.compiler import compile_journey
from fhir_outreach.journeys.files import from_resources
from fhir_outreach.settings import ENV_PREFIX, Settings
from tests.conftest import TOKEN

EXE = "/work/venv/bin/fhir-outreach"
ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "profiles" / "journeys" / "patient-discharge.yaml"
EVENTS = ROOT / "profiles" / "journeys" / "events" / "patient-discharge.ndjson"
DATA = Path(__file__).parent / "data"
CANONICAL = "http://fhir-outreach.org/journeys/patient-discharge|1.0.0"
STEP_LINE = re.compile(r"^  \[(\d+)\] (\S+)  (\S+) \((\w+)\): (.*)$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    return {**env, **extra}


def cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EXE, "journey", *map(str, args)], capture_output=True, text=True, timeout=120,
                          env=env or clean_env(), cwd=cwd)


def cli_all(*calls: tuple[str | Path, ...], env: dict[str, str]) -> list[subprocess.CompletedProcess[str]]:
    """Several read-only commands at once (they only read the store)."""
    procs = [subprocess.Popen([EXE, "journey", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for args in calls]
    out = []
    for proc, args in zip(procs, calls, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        out.append(subprocess.CompletedProcess([EXE, "journey", *map(str, args)], proc.returncode, stdout, stderr))
    return out


def sample() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return compile_journey(yaml.safe_load(SAMPLE.read_text()))


def by_url(templates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["url"]: t for t in templates}


# --- validate ----------------------------------------------------------------------------------------

def test_validate_the_sample() -> None:
    proc = cli("validate", SAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = len(yaml.safe_load(SAMPLE.read_text())["steps"])
    assert proc.stdout.startswith(f"{SAMPLE}: ok — {CANONICAL} (active), {steps} steps, 4 templates"), proc.stdout


def test_validate_reports_every_problem_of_every_file() -> None:
    bad = DATA / "invalid" / "unknown-target-next.yaml"
    many = DATA / "invalid" / "many-problems.yaml"
    proc = cli("validate", SAMPLE, bad, many)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"{SAMPLE}: ok" in out
    assert f"{bad}: INVALID\n  - step a: goes to unknown step 'nowhere'\n" in out
    block = out.split(f"{many}: INVALID\n", 1)[1]
    problems = [line for line in block.splitlines() if line.startswith("  - ")]
    assert len(problems) == 5, block
    assert "  - step loop: cycle without a wait: loop -> loop" in problems
    assert proc.stderr == ""


def test_validate_reports_a_yaml_shape_error() -> None:
    path = DATA / "shape" / "two-kinds.yaml"
    proc = cli("validate", path)
    assert proc.returncode == 1
    assert f"{path}: INVALID\n  - step a: needs exactly one of" in proc.stdout


def test_validate_reports_a_bad_duration_without_a_traceback() -> None:
    path = DATA / "shape" / "bad-duration-wait.yaml"
    proc = cli("validate", path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{path}: INVALID\n  - step pause:" in proc.stdout


# --- simulate ----------------------------------------------------------------------------------------

def runs_of(transcript: str) -> dict[str, dict[str, Any]]:
    """The transcript's runs by patient: status line and (step, kind, note) of each executed step."""
    out: dict[str, dict[str, Any]] = {}
    for block in transcript.split("\nrun ")[1:]:
        lines = block.splitlines()
        patient = next(line.split()[-1] for line in lines if line.startswith("  patient  "))
        status = next(line.removeprefix("  status   ") for line in lines if line.startswith("  status   "))
        steps = [(m[3], m[4], m[5]) for line in lines if (m := STEP_LINE.match(line))]
        out[patient] = {"status": status, "steps": steps, "text": block}
    return out


def test_simulate_is_deterministic_writes_nothing_and_takes_the_expected_paths(tmp_path: Path) -> None:
    work = tmp_path / "work"
    tmp = tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = clean_env(TMPDIR=str(tmp))
    before = sorted(work.rglob("*"))
    first = cli("simulate", SAMPLE, "--events", EVENTS, env=env, cwd=work)
    second = cli("simulate", SAMPLE, "--events", EVENTS, env=env, cwd=work)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert first.stdout.encode() == second.stdout.encode()
    assert sorted(work.rglob("*")) == before == []
    assert sorted(tmp.rglob("*")) == []  # the throw-away store is gone too

    text = first.stdout
    assert text.startswith(f"simulation of {CANONICAL}: 8 events, 2 runs\n")
    runs = runs_of(text)
    assert set(runs) == {"Patient/pat-high", "Patient/pat-low"}

    high = runs["Patient/pat-high"]
    assert high["status"] == "completed at 2026-03-04T10:00:00Z"
    assert [(s, k) for s, k, _ in high["steps"]] == [("risk", "branch"), ("call", "task")]
    assert high["steps"][0][2] == "high-risk -> call"
    assert high["steps"][1][2].startswith("task Task/")
    assert "%highrisk.exists() = true  [arm high-risk]" in high["text"]
    assert "evidence: Condition/cond-hf" in high["text"]

    low = runs["Patient/pat-low"]
    assert low["status"] == "completed at 2026-03-06T12:00:00Z"
    assert [(s, k) for s, k, _ in low["steps"]] == [
        ("risk", "branch"), ("portal", "message"), ("portal-read", "await"), ("portal-read", "await"),
        ("prefs", "preference"), ("sms", "message"), ("sms-reply", "await"), ("sms-reply", "await"),
        ("reply-yes", "branch"), ("call", "task")]
    notes = [n for _, _, n in low["steps"]]
    assert notes[0] == "else -> portal"
    assert notes[1].startswith("portal message Communication/")
    assert notes[3] == "timed out -> prefs"
    assert notes[4] == "contact preference sms -> sms"
    assert notes[5].startswith("sms message Communication/")
    assert notes[7].endswith("-> reply-yes") and "Communication/reply-1" in notes[7]
    assert notes[8] == "said-yes -> call"
    assert notes[9].startswith("task Task/")
    # the reply in the events file answers the SMS this run wrote (ids are derived, so stable)
    sms = notes[5].removeprefix("sms message ")
    assert f'"inResponseTo": [{{"reference": "{sms}"}}]' in EVENTS.read_text()


def test_simulate_refuses_an_invalid_journey(tmp_path: Path) -> None:
    proc = cli("simulate", DATA / "invalid" / "unknown-target-next.yaml", "--events", EVENTS, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "cannot simulate:\n  - step a: goes to unknown step 'nowhere'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --- against a store ---------------------------------------------------------------------------------

@pytest.fixture
def store_env(tmp_path: Path) -> dict[str, str]:
    return clean_env(**{f"{ENV_PREFIX}STORE": f"sqlite:///{tmp_path}/store.db",
                        f"{ENV_PREFIX}DATA_DIR": str(tmp_path / "data")})


async def discharge_high_risk_patient(settings: Settings) -> list[dict[str, Any]]:
    """Through the app on the same store: a high-risk patient is discharged; the active journey runs."""
    app = create_app(settings, run_background=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver",
            headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        enc = {"resourceType": "Encounter", "id": "enc-1", "status": "in-progress",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
               "subject": {"reference": "Patient/pat-high"}, "period": {"start": "2026-03-01T09:00:00Z"}}
        resources: list[dict[str, Any]] = [
            {"resourceType": "Practitioner", "id": "coordinator-1", "name": [{"family": "Care"}]},
            {"resourceType": "Patient", "id": "pat-high", "name": [{"given": ["Ben"], "family": "Okafor"}],
             "generalPractitioner": [{"reference": "Practitioner/coordinator-1"}]},
            {"resourceType": "Condition", "id": "cond-hf", "subject": {"reference": "Patient/pat-high"},
             "code": {"coding": [{"system": "http://snomed.info/sct", "code": "84114007"}]}},
            enc,
            {**enc, "status": "finished", "period": {"start": "2026-03-01T09:00:00Z", "end": "2026-03-04T10:00:00Z"}}]
        for res in resources:
            r = await c.put(f"/fhir/{res['resourceType']}/{res['id']}", json=res)
            assert r.status_code in (200, 201), r.text
            for _ in range(20):
                if not (await app.state.intake.processor.run_once()) + (await app.state.journeys.drain()):
                    break
        r = await c.get("/admin/runs")
        assert r.status_code == 200, r.text
        return list(r.json()["runs"])


def test_load_list_export_runs_and_why(tmp_path: Path, store_env: dict[str, str], make_settings: Any) -> None:
    plan, templates = sample()
    proc = cli("load", "--activate", SAMPLE, env=store_env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0] == f"{SAMPLE}: {CANONICAL} (active)"
    assert sorted(proc.stdout.splitlines()[1:]) == sorted(
        [f"  ActivityDefinition/{t['id']} created" for t in templates] + [f"  PlanDefinition/{plan['id']} created"])
    again = cli("load", "--activate", SAMPLE, env=store_env)
    assert again.returncode == 0 and again.stdout.count(" unchanged") == 5, again.stdout

    listed, exported, as_json, missing = cli_all(
        ("list",), ("export", "patient-discharge"), ("export", "patient-discharge", "--format", "json"),
        ("export", "no-such-journey"), env=store_env)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [CANONICAL, "active", "running"]

    assert exported.returncode == 0, exported.stderr
    plan2, templates2 = compile_journey(yaml.safe_load(exported.stdout))
    assert plan2 == plan and by_url(templates2) == by_url(templates)

    assert as_json.returncode == 0, as_json.stderr
    bundle = json.loads(as_json.stdout)
    assert bundle["resourceType"] == "Bundle" and len(bundle["entry"]) == 5
    plan3, templates3 = from_resources(bundle)
    assert plan3 == plan and by_url(templates3) == by_url(templates)

    assert missing.returncode == 1
    assert "no journey http://fhir-outreach.org/journeys/no-such-journey" in missing.stderr

    settings = make_settings(store=f"sqlite:///{tmp_path}/store.db", data_dir=tmp_path / "data")
    runs = asyncio.run(discharge_high_risk_patient(settings))
    assert [(r["journey"], r["patient"], r["status"]) for r in runs] == [(CANONICAL, "Patient/pat-high", "completed")]
    run_id = runs[0]["run"]

    listed, runs_out, why, why_json, nope = cli_all(
        ("list",), ("runs",), ("why", run_id), ("why", run_id, "--json"), ("why", "no-such-run"), env=store_env)
    assert listed.stdout.split() == [CANONICAL, "active", "running", "done=1"]
    assert [line.split()[0] for line in runs_out.stdout.splitlines()] == [run_id]

    assert why.returncode == 0, why.stderr
    text = why.stdout
    assert text.startswith(f"run {run_id}\n  journey  {CANONICAL}\n  patient  Patient/pat-high\n")
    assert "  trigger  update of Encounter/enc-1 (source local)" in text
    steps = [(m[3], m[4], m[5]) for line in text.splitlines() if (m := STEP_LINE.match(line))]
    assert [(s, k) for s, k, _ in steps] == [("risk", "branch"), ("call", "task")]
    assert steps[0][2] == "high-risk -> call"
    assert "%highrisk.exists() = true  [arm high-risk]" in text
    assert "evidence: Condition/cond-hf" in text

    explained = json.loads(why_json.stdout)
    assert explained["run"] == run_id and explained["status"] == "completed"
    assert [s["step"] for s in explained["steps"]] == ["risk", "call"]
    assert explained["steps"][0]["values"] == [{"arm": "high-risk", "expression": "%highrisk.exists()",
                                                "value": True}]

    assert nope.returncode == 1
    assert "no journey run 'no-such-run'" in nope.stderr


def test_export_is_the_same_text_every_time(store_env: dict[str, str]) -> None:
    assert cli("load", SAMPLE, env=store_env).returncode == 0
    first, second = (cli("export", "patient-discharge", env={**store_env, "PYTHONHASHSEED": seed}).stdout
                     for seed in ("0", "1"))
    assert first == second
