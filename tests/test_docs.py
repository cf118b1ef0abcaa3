"""The README matches the code: its first lines are the two commands, every setting is documented, and
the not-a-medical-device disclaimer is where it must be."""

from __future__ import annotations

from pathlib import Path

from fhir_outreach.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_first_lines_are_the_install_and_test_commands() -> None:
    lines = README.splitlines()
    assert lines[3] == "python3 -m venv .venv && . .venv/bin/activate && pip install . && fhir-outreach serve"
    assert lines[4] == 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && pytest'
    ci = (ROOT / ".ci" / "run").read_text()
    assert lines[4] in ci  # CI runs exactly the README's test command


def test_every_setting_is_documented() -> None:
    missing = [f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields
               if f"`{ENV_PREFIX}{name.upper()}`" not in README]
    assert not missing, f"settings missing from the README's table: {missing}"


def test_disclaimer_in_readme_and_profiles() -> None:
    for text in (README, (ROOT / "profiles" / "README.md").read_text()):
        assert "Not a medical device" in text
        assert "SNOMED CT" in text
