"""Settings: FHIR_OUTREACH_* variables, the TOML settings file, their precedence, and one-line errors that name
the bad setting, both from ``load_settings`` and from the ``fhir-outreach`` command (exit status 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fhir_outreach import cli
from fhir_outreach.errors import SettingsError
from fhir_outreach.settings import DEFAULT_STORE, load_settings

TOKEN_A = "token-aaaaaaaaaaaaaaaa"
TOKEN_B = "token-bbbbbbbbbbbbbbbb"


def settings_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fhir-outreach.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    s = load_settings()
    assert s.store == DEFAULT_STORE
    assert (s.host, s.port, s.auth) == ("127.0.0.1", 8080, "on")
    assert s.api_tokens == [] and s.jwt_issuer is None
    assert s.fhir_base == "http://127.0.0.1:8080/fhir"


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FHIR_OUTREACH_STORE", "mongodb://db.example.org:27017/outreach")
    monkeypatch.setenv("FHIR_OUTREACH_PORT", "9090")
    monkeypatch.setenv("FHIR_OUTREACH_HOST", "0.0.0.0")
    monkeypatch.setenv("FHIR_OUTREACH_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FHIR_OUTREACH_API_TOKENS", f" {TOKEN_A} ,{TOKEN_B},")
    monkeypatch.setenv("FHIR_OUTREACH_BASE_URL", "https://outreach.example.org/fhir/")
    monkeypatch.setenv("FHIR_OUTREACH_JWT_ISSUER", "https://issuer.example.org")
    monkeypatch.setenv("FHIR_OUTREACH_JWT_JWKS_URL", "https://issuer.example.org/jwks.json")
    monkeypatch.setenv("FHIR_OUTREACH_JWT_ALGORITHMS", "RS256,ES256")
    monkeypatch.setenv("FHIR_OUTREACH_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("fhir_outreach_log_level", "debug")  # variable names are case-insensitive
    s = load_settings()
    assert s.store == "mongodb://db.example.org:27017/outreach"
    assert (s.host, s.port) == ("0.0.0.0", 9090)
    assert s.data_dir == tmp_path / "d"
    assert s.api_tokens == [TOKEN_A, TOKEN_B]
    assert s.fhir_base == "https://outreach.example.org/fhir"
    assert s.jwt_issuer == "https://issuer.example.org"
    assert s.jwt_algorithms == ["RS256", "ES256"]
    assert s.max_body_bytes == 4096
    assert s.log_level == "debug"


def test_from_settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = settings_file(tmp_path, f"""
store = "sqlite:///{tmp_path}/file.db"
port = 9191
api_tokens = ["{TOKEN_A}"]
auth = "off"
jwt_algorithms = "ES256"
""")
    monkeypatch.setenv("FHIR_OUTREACH_SETTINGS_FILE", str(path))
    s = load_settings()
    assert s.store == f"sqlite:///{tmp_path}/file.db"
    assert s.port == 9191
    assert s.api_tokens == [TOKEN_A]
    assert s.auth == "off"
    assert s.jwt_algorithms == ["ES256"]
    assert s.host == "127.0.0.1"  # not in the file: the default


def test_environment_wins_over_file_and_arguments_win_over_both(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    path = settings_file(tmp_path, f'port = 9191\nhost = "10.0.0.1"\napi_tokens = ["{TOKEN_A}"]\n')
    monkeypatch.setenv("FHIR_OUTREACH_SETTINGS_FILE", str(path))
    monkeypatch.setenv("FHIR_OUTREACH_PORT", "9292")
    monkeypatch.setenv("FHIR_OUTREACH_API_TOKENS", TOKEN_B)
    s = load_settings()
    assert (s.port, s.host, s.api_tokens) == (9292, "10.0.0.1", [TOKEN_B])
    assert load_settings(port=9393).port == 9393


@pytest.mark.parametrize(("env", "message"), [
    pytest.param({"FHIR_OUTREACH_PORT": "eighty"},
                 "invalid setting FHIR_OUTREACH_PORT: Input should be a valid integer, unable to parse string as an "
                 "integer (got 'eighty')", id="port-not-a-number"),
    pytest.param({"FHIR_OUTREACH_PORT": "70000"},
                 "invalid setting FHIR_OUTREACH_PORT: Input should be less than or equal to 65535 (got '70000')",
                 id="port-out-of-range"),
    pytest.param({"FHIR_OUTREACH_STORE": "postgres://db/outreach"},
                 "invalid setting FHIR_OUTREACH_STORE: must be sqlite:///path/to/file.db or "
                 "mongodb://host[:port]/dbname (got 'postgres://db/outreach')", id="bad-store-url"),
    pytest.param({"FHIR_OUTREACH_STORE": "sqlite:///"},
                 "invalid setting FHIR_OUTREACH_STORE: must be sqlite:///path/to/file.db or "
                 "mongodb://host[:port]/dbname (got 'sqlite:///')", id="sqlite-without-path"),
    pytest.param({"FHIR_OUTREACH_API_TOKENS": f"{TOKEN_A},tooshort"},
                 "invalid setting FHIR_OUTREACH_API_TOKENS: every token must be at least 16 characters long",
                 id="short-token"),
    pytest.param({"FHIR_OUTREACH_AUTH": "maybe"},
                 "invalid setting FHIR_OUTREACH_AUTH: Input should be 'on' or 'off' (got 'maybe')", id="bad-auth"),
    pytest.param({"FHIR_OUTREACH_BASE_URL": "outreach.example.org/fhir"},
                 "invalid setting FHIR_OUTREACH_BASE_URL: must be an absolute http(s) URL "
                 "(got 'outreach.example.org/fhir')", id="relative-base-url"),
    pytest.param({"FHIR_OUTREACH_MAX_BODY_BYTES": "10"},
                 "invalid setting FHIR_OUTREACH_MAX_BODY_BYTES: Input should be greater than or equal to 1024 "
                 "(got '10')", id="tiny-body-limit"),
    pytest.param({"FHIR_OUTREACH_JWT_ISSUER": "https://issuer.example.org"},
                 "invalid settings: FHIR_OUTREACH_JWT_JWKS_URL is required when FHIR_OUTREACH_JWT_ISSUER is set",
                 id="jwt-issuer-without-jwks"),
    pytest.param({"FHIR_OUTREACH_SETTINGS_FILE": "/nonexistent/fhir-outreach.toml"},
                 "FHIR_OUTREACH_SETTINGS_FILE: no such file /nonexistent/fhir-outreach.toml", id="missing-file"),
])
def test_bad_setting(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_unknown_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_OUTREACH_PROT", "8080")  # a typo must not silently fall back to the default
    with pytest.raises(SettingsError) as err:
        load_settings()
    text = str(err.value)
    assert text.startswith("unknown setting FHIR_OUTREACH_PROT (known: ")
    assert "FHIR_OUTREACH_PORT" in text and "FHIR_OUTREACH_SETTINGS_FILE" in text
    assert "\n" not in text


def test_tokens_are_never_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_OUTREACH_API_TOKENS", f"{TOKEN_A},s3cr3t")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "s3cr3t" not in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    pytest.param("port = [\n", "is not valid TOML: ", id="not-toml"),
    pytest.param("prot = 8080\n", "unknown setting 'prot' in the file named by FHIR_OUTREACH_SETTINGS_FILE (known: ",
                 id="unknown-key"),
    pytest.param('port = "eighty"\n', "invalid setting FHIR_OUTREACH_PORT: Input should be a valid integer",
                 id="bad-value"),
])
def test_bad_settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, message: str) -> None:
    monkeypatch.setenv("FHIR_OUTREACH_SETTINGS_FILE", str(settings_file(tmp_path, text)))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [None, b"\xff\xfeport = 1\n"], ids=["a-directory", "not-utf8"])
def test_unreadable_settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "settings.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    monkeypatch.setenv("FHIR_OUTREACH_SETTINGS_FILE", str(path))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value).startswith(f"FHIR_OUTREACH_SETTINGS_FILE: cannot read {path}: ")
    assert "\n" not in str(err.value)


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any attempt to start the server, the app or a worker."""
    started: list[str] = []

    def refuse(what: str) -> Any:
        def run(*args: Any, **kwargs: Any) -> None:
            started.append(what)
            raise AssertionError(f"{what} must not start with a bad setting")
        return run

    import uvicorn

    from fhir_outreach import app
    from fhir_outreach.work import worker

    monkeypatch.setattr(uvicorn, "run", refuse("uvicorn.run"))
    monkeypatch.setattr(app, "create_app", refuse("create_app"))
    monkeypatch.setattr(worker, "run_worker", refuse("run_worker"))
    return started


@pytest.mark.parametrize(("env", "argv", "line"), [
    pytest.param({"FHIR_OUTREACH_PORT": "eighty"}, ["serve"],
                 "fhir-outreach: invalid setting FHIR_OUTREACH_PORT: Input should be a valid integer, unable to "
                 "parse string as an integer (got 'eighty')", id="serve-bad-port"),
    pytest.param({"FHIR_OUTREACH_STORE": "redis://cache"}, ["serve"],
                 "fhir-outreach: invalid setting FHIR_OUTREACH_STORE: must be sqlite:///path/to/file.db or "
                 "mongodb://host[:port]/dbname (got 'redis://cache')", id="serve-bad-store"),
    pytest.param({"FHIR_OUTREACH_PROT": "1"}, ["serve"], "fhir-outreach: unknown setting FHIR_OUTREACH_PROT",
                 id="serve-unknown-variable"),
    pytest.param({"FHIR_OUTREACH_API_TOKENS": "short"}, ["worker"],
                 "fhir-outreach: invalid setting FHIR_OUTREACH_API_TOKENS: every token must be at least 16 "
                 "characters long", id="worker-short-token"),
    pytest.param({}, ["--settings", "/nonexistent/x.toml", "serve"],
                 "fhir-outreach: FHIR_OUTREACH_SETTINGS_FILE: no such file /nonexistent/x.toml", id="missing-file"),
    pytest.param({}, ["serve", "--port", "70000"],
                 "fhir-outreach: invalid setting FHIR_OUTREACH_PORT: Input should be less than or equal to 65535",
                 id="port-argument"),
])
def test_cli_bad_setting_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               nothing_starts: list[str], env: dict[str, str], argv: list[str],
                                               line: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # --settings writes FHIR_OUTREACH_SETTINGS_FILE into the environment: make monkeypatch restore it.
    monkeypatch.setenv("FHIR_OUTREACH_SETTINGS_FILE", "")
    monkeypatch.delenv("FHIR_OUTREACH_SETTINGS_FILE")
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(line), err
    assert nothing_starts == []


@pytest.mark.parametrize(("name", "value", "words"), [
    ("FHIR_OUTREACH_QUIET_HOURS", "9pm-8am", "HH:MM-HH:MM"),
    ("FHIR_OUTREACH_QUIET_HOURS", "25:00-08:00", "HH:MM-HH:MM"),
    ("FHIR_OUTREACH_DEFAULT_TIMEZONE", "Mars/Olympus", "unknown time zone"),
    ("FHIR_OUTREACH_WRITEBACK_SOURCE", "nowhere", "no source named"),
    ("FHIR_OUTREACH_SMS_PROVIDER", "carrier-pigeon", "FHIR_OUTREACH_SMS_PROVIDER"),
])
def test_channel_settings_are_checked_at_start(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                               words: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert words in str(info.value) and "\n" not in str(info.value)


def test_quiet_hours_may_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIR_OUTREACH_QUIET_HOURS", "")
    assert load_settings().quiet_hours is None
