"""``ray-app keys`` and ``ray-app usage``: admin commands over the key store and the spend ledger."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

import pytest
import yaml
from typer.testing import CliRunner

from ray_app.accounting.keys import AuthError, KeyStore, Scopes
from ray_app.accounting.ledger import Ledger, LedgerEntry
from ray_app.cli import app
from ray_app.serve.config import load_serve_config

runner = CliRunner()
SECRET = re.compile(r"rk-[0-9a-f]{12}-\S+")


@pytest.fixture
def env(tmp_path):
    """A Serve config of our own (auth: default budget $7.50, monthly) and a fresh data directory."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{"name": "app", "import_path": "ray_app.serve.app:build_app",
        "args": {"llms": [{"name": "m", "source": "m"}],
                 "auth": {"mode": "keys", "budget_period": "month", "default_budget_usd": 7.5, "default_rpm": 60,
                          "default_tpm": 1000}}}]}))
    data = tmp_path / "data"
    args = ["--config", str(config), "--data-dir", str(data)]
    [(_, app_config)] = load_serve_config(config)
    app_config = app_config.model_copy(update={"data_dir": str(data)})
    ledger_path = app_config.auth.ledger_file(app_config.paths)
    assert ledger_path == data / "router" / "ledger.sqlite"
    return args, ledger_path


def invoke(*args: str):
    return runner.invoke(app, list(args))


def said(result) -> str:
    """Everything printed, with rich's line wrapping of messages undone."""
    return " ".join(result.output.split())


def create(env, *extra: str) -> tuple[str, str]:
    args, _ = env
    result = invoke("keys", "create", *extra, *args)
    assert result.exit_code == 0, result.output
    assert "will not be shown again" in result.output
    (secret,) = SECRET.findall(result.stdout)
    key_id = re.search(r"key_id: (\S+)", result.stdout).group(1)
    assert secret.startswith(f"rk-{key_id}-")
    return key_id, secret


def list_json(env) -> list[dict]:
    result = invoke("keys", "list", "--json", *env[0])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_keys_help_renders():
    result = invoke("keys", "--help")
    assert result.exit_code == 0, result.output
    for command in ("create", "list", "revoke"):
        assert command in result.output
    result = invoke("usage", "--help")
    assert result.exit_code == 0 and "--group-by" in result.output


def test_create_list_authenticate_revoke(env):
    args, ledger_path = env
    alice, alice_secret = create(env, "alice", "--budget", "5", "--rpm", "10", "--confidential", "--write", "hr,legal",
                                 "--clearance", "confidential", "--max-tokens", "256")
    bob, bob_secret = create(env, "bob")
    assert alice != bob

    # The printed secret is a working bearer token, with the limits given on the command line.
    store = KeyStore(ledger_path)
    record = store.authenticate(f"Bearer {alice_secret}")
    assert (record.key_id, record.name, record.budget_usd, record.rpm, record.tpm, record.confidential) == (
        alice, "alice", 5.0, 10, None, True)
    assert record.scopes == Scopes(admin=False, read=("*",), write=("hr", "legal"), clearance="confidential")
    assert record.max_tokens == 256
    assert store.authenticate(bob_secret).key_id == bob

    # Spend this budget period counts; last year's does not.
    with Ledger(ledger_path) as ledger:
        for cost, ts in ((0.25, time.time()), (0.5, time.time()), (100.0, time.time() - 400 * 86400)):
            ledger.record(LedgerEntry(alice, "auto", "local", "m", 10, 5, cost, 0.1, "ok", ts=ts))

    table = invoke("keys", "list", *args)
    assert table.exit_code == 0, table.output
    for text in (alice, bob, "alice", "bob", "active", "$5.00", "default $7.50", "default 60", "default 1000",
                 "$0.7500", "$0.0000"):
        assert text in table.stdout, text
    listed = list_json(env)
    for output in (table.output, json.dumps(listed)):
        for secret in (alice_secret, bob_secret):
            assert secret not in output and secret.split("-", 2)[2] not in output
        assert "hash" not in output and "salt" not in output
    by_id = {k["key_id"]: k for k in listed}
    assert list(by_id) == [alice, bob]
    assert by_id[alice] | {"created_at": None} == {
        "key_id": alice, "name": "alice", "created_at": None, "status": "active", "revoked_at": None,
        "budget_usd": 5.0, "rpm": 10, "tpm": None, "effective_budget_usd": 5.0, "effective_rpm": 10,
        "effective_tpm": 1000, "confidential": True, "budget_period": "month",
        "scopes": {"admin": False, "read": ["*"], "write": ["hr", "legal"], "clearance": "confidential",
                   "fine_tune": False},
        "max_tokens": 256, "max_n": None, "max_request_usd": None, "capture": False,
        "period_start": datetime.now(UTC).strftime("%Y-%m-01"), "spend_usd": pytest.approx(0.75)}
    assert by_id[alice]["created_at"].startswith(datetime.now(UTC).strftime("%Y-%m-%d"))
    assert by_id[bob]["effective_budget_usd"] == 7.5 and by_id[bob]["budget_usd"] is None
    assert by_id[bob]["spend_usd"] == 0 and not by_id[bob]["confidential"]

    result = invoke("keys", "revoke", alice, *args)
    assert result.exit_code == 0, result.output
    assert "revoked" in result.output
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(alice_secret)
    assert store.authenticate(bob_secret).key_id == bob  # only that key
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert f"revoked {today}" in invoke("keys", "list", *args).stdout
    by_id = {k["key_id"]: k for k in list_json(env)}
    assert by_id[alice]["status"] == "revoked" and by_id[alice]["revoked_at"].startswith(today)
    assert by_id[bob]["status"] == "active"

    again = invoke("keys", "revoke", alice, *args)
    assert again.exit_code == 0 and "already revoked" in said(again)
    store.close()


def test_revoke_unknown_key_exits_1(env):
    create(env, "alice")
    result = invoke("keys", "revoke", "000000000000", *env[0])
    assert result.exit_code == 1
    assert "no key '000000000000'" in said(result)


def test_missing_serve_config_exits_1(tmp_path):
    result = invoke("keys", "list", "--config", str(tmp_path / "nope.yaml"), "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "nope.yaml not found" in said(result)


def _ts(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    return datetime(2025, 3, day, hour, minute, second, tzinfo=UTC).timestamp()


@pytest.fixture
def usage_env(env):
    """Two keys, two models, two UTC days (one row a second before midnight, one at midnight)."""
    rows = [  # key, model, ts, prompt, completion, cost
        ("k1", "m-a", _ts(14, 9), 100, 10, 0.01),
        ("k1", "m-b", _ts(14, 23, 59, 59), 200, 20, 0.02),
        ("k1", "m-a", _ts(15, 0), 300, 30, 0.03),
        ("k2", "m-a", _ts(15, 12), 400, 40, 0.04),
        ("k2", "m-b", _ts(15, 13), 500, 50, 0.05),
        ("k2", "m-b", _ts(15, 14), 500, 50, 0.05),
    ]
    with Ledger(env[1]) as ledger:
        for key, model, ts, prompt, completion, cost in rows:
            ledger.record(LedgerEntry(key, "auto", "local", model, prompt, completion, cost, 0.1, "ok", ts=ts))
    return env


def usage(env, *options: str) -> dict:
    result = invoke("usage", "--json", *options, *env[0])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for row in report["rows"] + [report["total"]]:
        row["cost_usd"] = round(row["cost_usd"], 6)
    return report


def _measures(row: dict) -> tuple:
    return row["requests"], row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]


def test_usage_grouped_totals(usage_env):
    by_key = usage(usage_env, "--group-by", "key")
    assert {r["key"]: _measures(r) for r in by_key["rows"]} == {
        "k1": (3, 600, 60, 0.06), "k2": (3, 1400, 140, 0.14)}
    assert _measures(by_key["total"]) == (6, 2000, 200, 0.2)

    by_model_day = usage(usage_env, "--group-by", "model,day")
    assert {(r["model"], r["day"]): _measures(r) for r in by_model_day["rows"]} == {
        ("m-a", "2025-03-14"): (1, 100, 10, 0.01), ("m-b", "2025-03-14"): (1, 200, 20, 0.02),
        ("m-a", "2025-03-15"): (2, 700, 70, 0.07), ("m-b", "2025-03-15"): (2, 1000, 100, 0.1)}

    default = usage(usage_env)  # key, model, day
    assert default["group_by"] == ["key", "model", "day"]
    assert len(default["rows"]) == 5
    assert {(r["key"], r["model"], r["day"]): _measures(r) for r in default["rows"]}[("k2", "m-b", "2025-03-15")] == (
        2, 1000, 100, 0.1)
    assert _measures(default["total"]) == (6, 2000, 200, 0.2)

    # The table carries the same total.
    table = invoke("usage", "--group-by", "key", *usage_env[0])
    assert table.exit_code == 0, table.output
    total_line = next(line for line in table.stdout.splitlines() if "total" in line)
    assert re.findall(r"[\d.]+", total_line) == ["6", "2000", "200", "0.2000"]
    assert "k1" in table.stdout and "k2" in table.stdout


def test_usage_key_filter(usage_env):
    report = usage(usage_env, "--key", "k1", "--group-by", "model")
    assert {r["model"]: _measures(r) for r in report["rows"]} == {"m-a": (2, 400, 40, 0.04), "m-b": (1, 200, 20, 0.02)}
    assert _measures(report["total"]) == (3, 600, 60, 0.06)
    assert usage(usage_env, "--key", "nobody")["rows"] == []


def test_usage_day_filters_are_utc_days(usage_env):
    since = usage(usage_env, "--since", "2025-03-15", "--group-by", "day")
    assert {r["day"]: _measures(r) for r in since["rows"]} == {"2025-03-15": (4, 1700, 170, 0.17)}
    until = usage(usage_env, "--until", "2025-03-14", "--group-by", "day")  # the last day is included
    assert {r["day"]: _measures(r) for r in until["rows"]} == {"2025-03-14": (2, 300, 30, 0.03)}
    both = usage(usage_env, "--since", "2025-03-14", "--until", "2025-03-14", "--group-by", "key")
    assert _measures(both["total"]) == (2, 300, 30, 0.03)
    assert usage(usage_env, "--since", "2025-03-16")["rows"] == []


@pytest.mark.parametrize("options, message", [
    (["--group-by", "key,colour"], "colour"),
    (["--group-by", "week"], "week"),
    (["--since", "15/03/2025"], "YYYY-MM-DD"),
    (["--since", "2025-03-16", "--until", "2025-03-15"], "after"),
])
def test_usage_bad_options_exit_1(usage_env, options, message):
    result = invoke("usage", *options, *usage_env[0])
    assert result.exit_code == 1
    assert message in said(result)
    if "--group-by" in options:
        assert "choose from key, model, day, route, target, status" in said(result)
