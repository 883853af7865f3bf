"""RouterConfig: the shipped YAML loads, and bad configs fail with every problem listed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ray_app.schema import ConfigError
from ray_app.router.config import RouterConfig

ROOT = Path(__file__).resolve().parents[2]


def _target(name: str, kind: str = "openai", **extra) -> dict:
    base = {"name": name, "kind": kind, "model": "m", "context_window": 8192}
    if kind == "local":
        base["hourly_rate_usd"] = 1.0
    else:
        base |= {"price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
    if kind in ("openai", "azure"):
        base["api_key_env"] = "KEY"
    return base | extra


def test_shipped_config_loads():
    config = RouterConfig.load(ROOT / "configs" / "router.yaml")
    assert config.default_route in config.routes
    assert {t.kind for t in config.targets} == {"local", "openai", "azure", "bedrock"}
    assert config.target("local-small").privacy == "local"
    assert config.target("bedrock-haiku").privacy == "cloud"


def test_all_cross_reference_problems_are_listed(tmp_path):
    document = {
        "targets": [_target("a"), _target("a"), _target("b", "local")],
        "routes": {"auto": {"targets": ["a", "missing"]}, "best": {"targets": ["nope"]}},
        "default_route": "fastest",
    }
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(ConfigError) as caught:
        RouterConfig.load(path)
    problems = caught.value.problems
    assert len(problems) == 4, problems
    text = str(caught.value)
    assert "repeated: ['a']" in text
    assert "routes.auto.targets: unknown target 'missing'" in text
    assert "routes.best.targets: unknown target 'nope'" in text
    assert "default_route: 'fastest'" in text


@pytest.mark.parametrize("target, expected", [
    (_target("l", "local", hourly_rate_usd=None), "needs hourly_rate_usd"),
    (_target("l", "local", privacy="cloud"), "must have privacy 'local'"),
    (_target("c", "openai", price_out_per_mtok=None), "needs price_in_per_mtok and price_out_per_mtok"),
    (_target("z", "azure"), "needs base_url"),
    (_target("z", "azure", base_url="https://x", api_version="2024-10-21", privacy="local"), "not allowed"),
    (_target("b", "bedrock"), "needs region"),
    (_target("c", "openai", api_key_env="sk-proj-abc123"), "environment variable NAME"),
    (_target("c", "openai", quality=11), "less than or equal to 10"),
    (_target("c", "openai", capabilities=["poetry"]), "capabilities.0"),
    (_target("c", "openai", colour="red"), "Extra inputs are not permitted"),
])
def test_bad_target_is_reported(target, expected):
    with pytest.raises(ConfigError, match=expected):
        RouterConfig.parse({"targets": [target], "routes": {"auto": {"targets": [target["name"]]}}})


def test_every_target_problem_is_listed():
    bad = _target("l", "local", hourly_rate_usd=None, privacy="cloud", api_key_env="lowercase")
    with pytest.raises(ConfigError) as caught:
        RouterConfig.parse({"targets": [bad], "routes": {"auto": {"targets": ["l"]}}})
    assert len(caught.value.problems) == 3
    assert all(p.startswith("targets.0") for p in caught.value.problems)


def test_self_hosted_openai_protocol_server_may_be_local():
    config = RouterConfig.parse({
        "targets": [_target("vllm", "openai", base_url="http://10.0.0.5:8000/v1", privacy="local",
                            price_in_per_mtok=0, price_out_per_mtok=0)],
        "routes": {"auto": {"targets": ["vllm"]}}})
    assert config.target("vllm").privacy == "local"


def test_local_targets_of_one_model_must_agree_on_its_price():
    with pytest.raises(ConfigError, match="disagree on hourly_rate_usd"):
        RouterConfig.parse({
            "targets": [_target("a", "local", model="m", hourly_rate_usd=1.0),
                        _target("b", "local", model="m", hourly_rate_usd=2.0)],
            "routes": {"auto": {"targets": ["a", "b"]}}})


def test_keys_and_budgets_are_not_router_settings():
    # they moved to the app's `auth` section; an old router config says so instead of being ignored
    with pytest.raises(ConfigError, match="keys: Extra inputs are not permitted"):
        RouterConfig.parse({"targets": [_target("a")], "routes": {"auto": {"targets": ["a"]}},
                            "keys": {"default_rpm": 1}})
