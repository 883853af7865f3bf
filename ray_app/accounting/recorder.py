"""``SpendRecorder``: the one owner of the ledger, and the one place a request is priced.

Every request, direct or routed, local or cloud, goes through it twice: ``reserve`` at admission
(a key with a budget holds the request's worst-case cost, so concurrent requests cannot overspend it;
a per-request ceiling refuses what could cost more) and ``settle`` at the end (the real cost goes into
one durable ledger row and the hold is released, in one transaction, before the answer goes out).

Prices: a local model costs the replica time a request used, its fair share when a replica serves
several requests at once (``ReplicaShare``), at the model's hourly rate; a cloud target costs the
tokens its provider reported at the target's prices. A routed request that failed over from a local
model to a cloud target pays for both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ray_app.accounting.config import AuthConfig
from ray_app.accounting.keys import KeyRecord
from ray_app.accounting.ledger import Ledger, LedgerEntry
from ray_app.accounting.limits import RateWindows

__all__ = ["CloudPrice", "CostCeilingExceeded", "GroupCommit", "Outcome", "ReplicaShare", "SpendRecorder",
           "cloud_cost", "local_cost"]

logger = logging.getLogger("ray_app.accounting")


def local_cost(hourly_rate_usd: float, replica_seconds: float) -> float:
    """USD for the replica time one request used."""
    return replica_seconds * hourly_rate_usd / 3600


def cloud_cost(price_in_per_mtok: float, price_out_per_mtok: float, prompt_tokens: int,
               completion_tokens: int) -> float:
    """USD for one request to a per-token-priced target."""
    return (prompt_tokens * price_in_per_mtok + completion_tokens * price_out_per_mtok) / 1e6


@dataclass(frozen=True)
class CloudPrice:
    in_per_mtok: float
    out_per_mtok: float


class CostCeilingExceeded(Exception):
    def __init__(self, key_id: str, estimate_usd: float, ceiling_usd: float):
        self.key_id, self.estimate_usd, self.ceiling_usd = key_id, estimate_usd, ceiling_usd
        super().__init__(f"this request may cost up to ${estimate_usd:.4f}, over key {key_id}'s per-request "
                         f"ceiling of ${ceiling_usd:.4f}; lower max_tokens or n")


class ReplicaShare:
    """Replica seconds used by each in-flight request of one local backend, shared fairly.

    With ``n`` requests in flight on ``replicas`` replicas, each request is charged
    ``dt * min(1, replicas / n)`` for every interval ``dt``: a replica batching eight requests costs
    each of them an eighth of its time, and the shares of a request add up to what it really used.
    """

    def __init__(self, replicas: int = 1, clock: Callable[[], float] = time.monotonic):
        self.replicas = replicas
        self._clock = clock
        self._active: dict[int, float] = {}
        self._ids = itertools.count()
        self._last = clock()

    def _advance(self) -> None:
        now = self._clock()
        if self._active:
            share = (now - self._last) * min(1.0, self.replicas / len(self._active))
            for token in self._active:
                self._active[token] += share
        self._last = now

    def start(self) -> int:
        self._advance()
        token = next(self._ids)
        self._active[token] = 0.0
        return token

    def stop(self, token: int) -> float:
        self._advance()
        return self._active.pop(token, 0.0)

    @property
    def in_flight(self) -> int:
        return len(self._active)


class GroupCommit:
    """Ledger rows of concurrent requests written in shared transactions: ``write`` returns once its
    row is on disk, and rows that arrive while a commit runs go into the next one. Requests that end
    together (32 clients' streams finish in the same engine step) pay one disk flush and one thread
    hop between them instead of one each, and their answers go out that much sooner."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._pending: list[tuple[LedgerEntry, str | None, asyncio.Future]] = []
        self._committing: asyncio.Task | None = None

    async def write(self, entry: LedgerEntry, reservation: str | None) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((entry, reservation, done))
        if self._committing is None or self._committing.done() or self._committing.get_loop() is not loop:
            self._committing = loop.create_task(self._commit())
        # A cancelled writer's row is still written: it is in the batch already.
        await done

    async def _commit(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            waiting = [done for *_, done in batch]
            try:
                await asyncio.to_thread(self.ledger.record_many, [(entry, held) for entry, held, _ in batch])
            except asyncio.CancelledError:
                for done in waiting:
                    done.cancel()
                raise
            except Exception as exc:  # the disk refused: every request of the batch hears it
                for done in waiting:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for done in waiting:
                    if not done.done():
                        done.set_result(None)


@dataclass
class Outcome:
    """What one request used; ``SpendRecorder.settle`` prices it."""

    route: str  # "direct", or the route the client named
    target: str  # the served model (direct) or the router target that answered
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    replica_s: dict[str, float] = field(default_factory=dict)  # local backend -> replica seconds (all attempts)
    cloud_target: str | None = None  # the cloud target whose reported tokens are charged
    status: str = "ok"
    started: float = field(default_factory=time.monotonic)


class SpendRecorder:
    def __init__(self, config: AuthConfig, ledger: Ledger, *, local_rates: Mapping[str, float] | None = None,
                 cloud_prices: Mapping[str, CloudPrice] | None = None, replicas: Mapping[str, int] | None = None,
                 windows: RateWindows | None = None, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.config = config
        self.ledger = ledger
        self.windows = windows or RateWindows(config.default_rpm, config.default_tpm, wall_clock)
        self.local_rates = dict(local_rates or {})
        self.cloud_prices = dict(cloud_prices or {})
        self._replicas = dict(replicas or {})
        self._shares: dict[str, ReplicaShare] = {}
        self._clock, self._wall_clock = clock, wall_clock
        self._rows = GroupCommit(ledger)

    # -- prices --------------------------------------------------------------------------------

    def hourly_rate(self, backend: str) -> float:
        return self.local_rates.get(backend, self.config.local_hourly_rate_usd)

    def cost(self, outcome: Outcome) -> float:
        total = sum(local_cost(self.hourly_rate(backend), s) for backend, s in outcome.replica_s.items())
        if outcome.cloud_target is not None:
            price = self.cloud_prices[outcome.cloud_target]
            total += cloud_cost(price.in_per_mtok, price.out_per_mtok, outcome.prompt_tokens,
                                outcome.completion_tokens)
        return total

    def estimate_local(self, backend: str, completion_tokens: int) -> float:
        """Worst case of a direct request: the whole replica for as long as decoding takes."""
        return local_cost(self.hourly_rate(backend), completion_tokens / self.config.local_decode_tokens_per_s)

    # -- replica time --------------------------------------------------------------------------

    def share(self, backend: str) -> ReplicaShare:
        if backend not in self._shares:
            self._shares[backend] = ReplicaShare(self._replicas.get(backend, 1), self._clock)
        return self._shares[backend]

    # -- budgets -------------------------------------------------------------------------------

    def budget(self, key: KeyRecord) -> float | None:
        return key.budget_usd if key.budget_usd is not None else self.config.default_budget_usd

    def period_start(self, now: float | None = None) -> float:
        day = datetime.fromtimestamp(self._wall_clock() if now is None else now, UTC).replace(
            hour=0, minute=0, second=0, microsecond=0)
        return (day if self.config.budget_period == "day" else day.replace(day=1)).timestamp()

    async def reserve(self, key: KeyRecord | None, estimate_usd: float) -> str | None:
        """Hold ``estimate_usd`` of the key's budget (None when there is nothing to hold against).
        Raises ``CostCeilingExceeded`` or ``ledger.BudgetExceeded``."""
        if key is None:
            return None
        if key.max_request_usd is not None and estimate_usd > key.max_request_usd:
            raise CostCeilingExceeded(key.key_id, estimate_usd, key.max_request_usd)
        budget = self.budget(key)
        if budget is None:
            return None
        return await asyncio.to_thread(self.ledger.reserve, key.key_id, estimate_usd, budget, self.period_start(),
                                       self.config.reservation_ttl_s, self.config.budget_period)

    async def release(self, reservation: str | None) -> None:
        if reservation is not None:
            await asyncio.to_thread(self.ledger.release, reservation)

    async def settle(self, key: KeyRecord | None, reservation: str | None, outcome: Outcome,
                     estimated_tokens: int = 0) -> float:
        """Price ``outcome``, write its ledger row and release the hold; durable when this returns."""
        cost = self.cost(outcome)
        entry = LedgerEntry(
            key_id=key.key_id if key else None, route=outcome.route, target=outcome.target, model=outcome.model,
            prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens, cost_usd=cost,
            latency_s=self._clock() - outcome.started, status=outcome.status)
        await self._rows.write(entry, reservation)
        if key is not None:
            self.windows.settle(key.key_id, estimated_tokens, outcome.prompt_tokens + outcome.completion_tokens)
        from ray_app.metrics import record_spend

        record_spend(outcome.route, outcome.target, outcome.status, cost)
        return cost
