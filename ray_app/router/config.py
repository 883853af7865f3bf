"""The typed schema of the smart router: targets, routes, policy knobs, keys and budgets.

``RouterConfig`` is the single source of truth; ``configs/router.yaml`` is an instance of it.
``RouterConfig.load`` reports every problem at once (bad fields and dangling route references alike)
as one ``ConfigError``, before any provider client or ledger is created.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ray_app.config_error import ConfigError
from ray_app.paths import DataDir

__all__ = ["BreakerConfig", "Capability", "ConfigError", "KeysConfig", "PolicyConfig", "Privacy", "Route",
           "RouterConfig", "Target", "TargetKind"]

TargetKind = Literal["local", "openai", "azure", "bedrock"]
Privacy = Literal["local", "cloud"]
Capability = Literal["code", "math", "summarize", "chat", "multilingual"]

# An env var *name*; anything else (e.g. a pasted "sk-..." key) is rejected so secrets never sit in YAML.
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


class _Strict(BaseModel):
    # A typo in a YAML key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class _Problems(ValueError):
    """Several cross-reference problems raised from one validator, kept apart so ``load`` lists each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class Target(_Strict):
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
            raise _Problems(problems)
        return self


class Route(_Strict):
    """A named route clients pick with ``model``: candidate targets plus the rules that order them."""

    targets: list[str] = Field(
        min_length=1, description="Candidate target names; the fallback order for prefer 'order'.")
    prefer: Literal["balanced", "cost", "quality", "order"] = Field(
        "balanced", description="balanced: capability, then quality if complex, then cost; cost: cheapest first; "
                                "quality: best first; order: as listed.")
    min_quality: int | None = Field(None, ge=1, le=10, description="Drop candidates below this quality.")
    allow_cloud: bool = Field(True, description="False keeps every request on this route on local targets.")
    max_chain: PositiveInt = Field(3, description="Longest fallback chain returned.")


class BreakerConfig(_Strict):
    failure_threshold: PositiveInt = Field(5, description="Consecutive failures that open the breaker.")
    cooldown_s: PositiveFloat = Field(30.0, description="Open time before a half-open probe is allowed.")


class PolicyConfig(_Strict):
    long_prompt_tokens: PositiveInt = Field(2000, description="Prompts this long count as complex.")
    default_max_tokens: PositiveInt = Field(
        512, description="Completion tokens assumed when a request sets no max_tokens (context fit, cost).")
    chars_per_token: PositiveFloat = Field(4.0, description="Latin-script characters per token for estimates.")
    max_error_rate: float = Field(0.5, gt=0, le=1, description="Targets above this error-rate EWMA go last.")
    ewma_alpha: float = Field(0.2, gt=0, le=1, description="Weight of the newest sample in latency/error EWMAs.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)


class KeysConfig(_Strict):
    ledger_path: str | None = Field(
        None, description="SQLite file for spend and keys; default <data_dir>/router/ledger.sqlite.")
    budget_period: Literal["day", "month"] = Field("month", description="Period a key's budget covers (UTC).")
    default_budget_usd: PositiveFloat | None = Field(
        None, description="Budget for keys without their own; unset: none.")
    default_rpm: PositiveInt | None = Field(60, description="Requests per minute for keys without their own.")
    default_tpm: PositiveInt | None = Field(100_000, description="Tokens per minute for keys without their own.")


class RouterConfig(_Strict):
    data_dir: str | None = Field(None, description="Default ./data or $RAY_APP_DATA_DIR.")
    targets: list[Target] = Field(min_length=1)
    routes: dict[str, Route] = Field(min_length=1)
    default_route: str = Field("auto", description="Route used when a request names none.")
    local_hourly_rate_usd: PositiveFloat = Field(
        0.50, description="USD per replica-hour charged for requests that name a served model directly "
                          "(not through a route), embeddings included.")
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)

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
        if self.default_route not in self.routes:
            problems.append(f"default_route: {self.default_route!r} is not a route "
                            f"(routes: {sorted(self.routes)})")
        if problems:
            raise _Problems(problems)
        return self

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def ledger_path(self) -> Path:
        if self.keys.ledger_path:
            return Path(self.keys.ledger_path).expanduser().resolve()
        return DataDir.from_path(self.data_dir).root / "router" / "ledger.sqlite"

    @classmethod
    def parse(cls, document: dict[str, Any], source: str = "router config") -> RouterConfig:
        try:
            return cls.model_validate(document)
        except ValidationError as e:
            raise _config_error(source, e) from None

    @classmethod
    def load(cls, path: str | Path) -> RouterConfig:
        import yaml

        path = Path(path)
        return cls.parse(yaml.safe_load(path.read_text()) or {}, str(path))


def _config_error(source: str, error: ValidationError) -> ConfigError:
    problems = []
    for e in error.errors():
        loc = ".".join(str(part) for part in e["loc"]) or "(top level)"
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            problems += [f"{loc}: {p}" if loc != "(top level)" else p for p in cause.problems]
        else:
            problems.append(f"{loc}: {e['msg']}")
    return ConfigError(source, problems)
