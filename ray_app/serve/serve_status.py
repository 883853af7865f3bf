"""What Serve says about the application: readiness for ``/health``, and whether a model has a
running replica, so a request fails fast (503) instead of queueing behind a replica being replaced.

The gateway reads Serve's status in the background; requests read the last snapshot and never wait
for the controller, and a snapshot's "no replica" is confirmed with a fresh read (shared by concurrent
requests, so an outage cannot flood the controller) before a request is refused.
"""

from __future__ import annotations

import asyncio

from ray.serve.schema import ReplicaState, ServeStatus

from ray_app.serve.config import AppConfig

__all__ = ["ServeStatusReader", "health_from_status", "unavailable_reason"]


def unavailable_reason(status: ServeStatus | None, app_name: str, deployment: str,
                       scales_to_zero: bool = False) -> str | None:
    """Why ``deployment`` cannot take a request now, or None. Unknown status means no verdict."""
    app = status.applications.get(app_name) if status else None
    if app is None or deployment not in app.deployments:
        return None
    d = app.deployments[deployment]
    running = d.replica_states.get(ReplicaState.RUNNING, 0)
    if running == 0 and not scales_to_zero:
        return f"no running replica ({d.status.value}{': ' + d.message if d.message else ''})"
    return None


def health_from_status(status: ServeStatus, app_name: str):
    """Ready only when the application and every one of its deployments is healthy."""
    from ray_app.serve.routes import HealthReport

    app = status.applications.get(app_name)
    if app is None:
        return HealthReport(False, {}, f"application {app_name!r} is not deployed")
    deployments = {name: d.status.value for name, d in app.deployments.items()}
    unhealthy = {n: d.message for n, d in app.deployments.items() if d.status.value != "HEALTHY"}
    ready = app.status.value == "RUNNING" and not unhealthy
    detail = "; ".join(f"{n}: {m or deployments[n]}" for n, m in unhealthy.items())
    return HealthReport(ready, deployments, detail)


class ServeStatusReader:
    def __init__(self, app_name: str, config: AppConfig, deployments: dict[str, str]):
        self.app_name = app_name
        self.interval_s = config.gateway.status_poll_interval_s
        self._deployments = deployments  # model -> its deployment's name
        self._scale_to_zero = {
            m.name for m in config.llms + config.embedders
            if m.replicas.autoscaling_config is not None and m.replicas.autoscaling_config.min_replicas == 0}
        self._status: ServeStatus | None = None
        self._refresh: asyncio.Future | None = None

    async def read(self) -> ServeStatus:
        from ray_app.serve.internals import serve_status

        return await asyncio.to_thread(serve_status)

    async def unavailable(self, model: str) -> str | None:
        if model not in self._deployments:
            return None
        deployment, scales_to_zero = self._deployments[model], model in self._scale_to_zero
        if unavailable_reason(self._status, self.app_name, deployment, scales_to_zero) is None:
            return None
        # The snapshot may predate a replica that has just started: confirm before refusing.
        return unavailable_reason(await self._fresh(), self.app_name, deployment, scales_to_zero)

    async def _fresh(self) -> ServeStatus | None:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read_quietly())
        return await asyncio.shield(self._refresh)

    async def _read_quietly(self) -> ServeStatus | None:
        try:
            self._status = await self.read()
        except Exception:  # the controller restarting is no reason to stop serving
            self._status = None
        return self._status

    async def poll(self) -> None:
        while True:
            await self._fresh()
            await asyncio.sleep(self.interval_s)
