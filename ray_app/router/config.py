"""The typed schema of the smart router: targets, routes, policy knobs, keys and budgets.

``RouterConfig`` is the single source of truth; ``configs/router.yaml`` is an instance of it.
``RouterConfig.load`` reports every problem at once (bad fields and dangling route references alike)
as one ``ConfigError``, before any provider client or ledger is created.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from ray_app.schema import ConfigError, Problems, Strict, load_yaml, parse

__all__ = ["BreakerConfig", "Capability", "ConfigError", "PolicyConfig", "Privacy", "Route", "RouterConfig", "Target",
           "TargetKind"]

TargetKind = Literal["local", "openai", "azure", "bedrock"]
Privacy = Literal["local", "cloud"]
# "tools": the target takes `tools` / `tool_choice` (a local target's model needs `tools:` in its config)
Capability = Literal["code", "math", "summarize", "chat", "multilingual", "tools"]

# An env var *name*; anything else (e.g. a pasted "sk-..." key) is rejected so secrets never sit in YAML.
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


class Target(Strict):
    """One place a request can go: a model served by ray_app, or a cloud provider's model."""

    name: str = Field(pattern=_NAME.pattern, description="Unique name routes refer to.")
    kind: TargetKind = Field(description="local = a ray_app-served model; otherwise the provider API used.")
    model: str = Field(description="Provider model id, local served model name, or Azure deployment name.")
    base_url: str | None = Field(
        None, description="API base URL (openai: optional; azure: the resource endpoint).")
    api_version: str | None = Field(None, description="Azure OpenAI api-version.")
    region: str | None = Field(None, description="Bedrock AWS region.")
    endpoint_url: str | None = Field(None, description="Bedrock endpoint override (VPC endpoint, tests).")
    api_key_env: str | None = Field(None, description="NAME of the env var holding the API key, never the key.")
    context_window: PositiveInt = Field(description="Tokens the model accepts (prompt + completion).")
    price_in_per_mtok: NonNegativeFloat | None = Field(None, description="USD per million prompt tokens.")
    price_out_per_mtok: NonNegativeFloat | None = Field(None, description="USD per million completion tokens.")
    hourly_rate_usd: PositiveFloat | None = Field(
        None, description="Local targets: USD per replica-hour; a request costs replica seconds x rate / 3600.")
    decode_tokens_per_s: PositiveFloat = Field(
        30.0, description="Local targets: decode speed used to estimate replica seconds when ranking by cost.")
    privacy: Privacy | None = Field(
        None, description="Where the data goes. Default: local for kind local, cloud otherwise.")
    capabilities: list[Capability] = Field(default_factory=lambda: ["chat"])
    quality: int = Field(5, ge=1, le=10, description="Relative answer quality; preferred for complex prompts.")
    timeout_s: PositiveFloat = Field(60.0, description="Per-attempt request timeout.")
    max_retries: NonNegativeInt = Field(2, description="Retries on 429/5xx/timeouts before falling back.")

    @model_validator(mode="after")
    def _check(self) -> Target:
        problems = []
        if self.privacy is None:
            self.privacy = "local" if self.kind == "local" else "cloud"
        # Only an OpenAI-protocol server may be declared local (a self-hosted vLLM, say); Azure and
        # Bedrock are someone else's machines whatever the network path.
        if self.privacy == "local" and self.kind in ("azure", "bedrock"):
            problems.append(f"privacy 'local' is not allowed for kind {self.kind!r}")
        if self.kind == "local" and self.privacy != "local":
            problems.append("kind 'local' targets must have privacy 'local'")
        if self.kind == "local" and self.hourly_rate_usd is None:
            # Without a rate local requests would look free and win every cost comparison.
            problems.append("kind 'local' needs hourly_rate_usd (local cost = replica seconds x rate)")
        if self.kind != "local" and (self.price_in_per_mtok is None or self.price_out_per_mtok is None):
            problems.append(f"kind {self.kind!r} needs price_in_per_mtok and price_out_per_mtok")
        if self.kind == "azure" and (not self.base_url or not self.api_version):
            problems.append("kind 'azure' needs base_url (the resource endpoint) and api_version")
        if self.kind == "bedrock" and not self.region:
            problems.append("kind 'bedrock' needs region")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            problems.append("api_key_env must be an environment variable NAME (A-Z, 0-9, _), not a key")
        if self.kind in ("openai", "azure") and self.api_key_env is None:
            problems.append(f"kind {self.kind!r} needs api_key_env")
        if problems:
            raise Problems(problems)
        return self


class Route(Strict):
    """A named route clients pick with ``model``: candidate targets plus the rules that order them."""

    targets: list[str] = Field(
        min_length=1, description="Candidate target names; the fallback order for prefer 'order'.")
    prefer: Literal["balanced", "cost", "quality", "order"] = Field(
        "balanced", description="balanced: capability, then quality if complex, then cost; cost: cheapest first; "
                                "quality: best first; order: as listed.")
    min_quality: int | None = Field(None, ge=1, le=10, description="Drop candidates below this quality.")
    allow_cloud: bool = Field(True, description="False keeps every request on this route on local targets.")
    max_chain: PositiveInt = Field(3, description="Longest fallback chain returned.")
    max_tokens: PositiveInt | None = Field(
        None, description="Largest max_tokens a request on this route may ask for; also its default.")
    max_n: PositiveInt | None = Field(None, description="Largest n (choices) a request on this route may ask for.")
    capture: bool = Field(False, description="Keep this route's chats as training conversations (opt-in).")


class BreakerConfig(Strict):
    failure_threshold: PositiveInt = Field(5, description="Consecutive failures that open the breaker.")
    cooldown_s: PositiveFloat = Field(30.0, description="Open time before a half-open probe is allowed.")


class PolicyConfig(Strict):
    long_prompt_tokens: PositiveInt = Field(2000, description="Prompts this long count as complex.")
    default_max_tokens: PositiveInt = Field(
        512, description="Completion tokens assumed when a request sets no max_tokens (context fit, cost).")
    chars_per_token: PositiveFloat = Field(4.0, description="Latin-script characters per token for estimates.")
    max_error_rate: float = Field(0.5, gt=0, le=1, description="Targets above this error-rate EWMA go last.")
    ewma_alpha: float = Field(0.2, gt=0, le=1, description="Weight of the newest sample in latency/error EWMAs.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


class RouterConfig(Strict):
    targets: list[Target] = Field(min_length=1)
    routes: dict[str, Route] = Field(min_length=1)
    default_route: str = Field("auto", description="Route used when a request names none.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @model_validator(mode="after")
    def _check_references(self) -> RouterConfig:
        problems = []
        names = [t.name for t in self.targets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"targets: names must be unique; repeated: {duplicates}")
        for route_name, route in self.routes.items():
            for target in route.targets:
                if target not in names:
                    problems.append(f"routes.{route_name}.targets: unknown target {target!r} "
                                    f"(known: {sorted(set(names))})")
        rates: dict[str, set[float]] = {}
        for t in self.targets:
            if t.kind == "local":
                rates.setdefault(t.model, set()).add(t.hourly_rate_usd)
        problems += [f"targets: local targets of model {m!r} disagree on hourly_rate_usd {sorted(r)}"
                     for m, r in rates.items() if len(r) > 1]
        if self.default_route not in self.routes:
            problems.append(f"default_route: {self.default_route!r} is not a route "
                            f"(routes: {sorted(self.routes)})")
        if problems:
            raise Problems(problems)
        return self

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    @classmethod
    def parse(cls, document: dict[str, Any], source: str = "router config") -> RouterConfig:
        return parse(cls, document, source)

    @classmethod
    def load(cls, path: str | Path) -> RouterConfig:
        return cls.parse(load_yaml(path), str(path))

    def local_rates(self) -> dict[str, float]:
        """Served model -> USD per replica-hour, from the local targets that price it."""
        return {t.model: t.hourly_rate_usd for t in self.targets if t.kind == "local"}
