"""The ``Router`` deployment: the cloud targets' provider clients, off the HTTP ingress.

The gateway decides (``RouterService``, in process) and streams local targets itself; this
deployment is in the data path only when a cloud target answers: it holds the SDK clients
(``openai`` for OpenAI and Azure OpenAI, ``boto3`` for Bedrock), their credentials from its
environment and their retries. A cloud target whose credentials are missing is not deployed: the
gateway reads ``deployed()`` and routes around it, and ``/health`` says why.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from ray_app.router.config import RouterConfig, Target
from ray_app.router.providers import OpenAIProvider, Provider, ProviderError, make_provider


def _missing_credentials(target: Target) -> str | None:
    if target.kind == "bedrock" and not target.endpoint_url:
        import boto3

        if boto3.Session().get_credentials() is None:
            return "no AWS credentials (environment, shared config or instance role)"
    return None


class CloudProviders:
    """Provider clients for every cloud target of a router config that has credentials here."""

    def __init__(self, config: RouterConfig, environ: dict[str, str] | None = None):
        self.config = config
        self.providers: dict[str, Provider] = {}
        self.unavailable: dict[str, str] = {}
        for target in config.targets:
            if target.kind == "local":
                continue
            try:
                if (why := _missing_credentials(target)) is not None:
                    raise ValueError(why)
                self.providers[target.name] = make_provider(target, os.environ if environ is None else environ)
            except ValueError as e:
                self.unavailable[target.name] = str(e)

    def deployed(self) -> dict[str, str | None]:
        """Cloud target -> None when it can take requests, else why not."""
        return {name: None for name in self.providers} | self.unavailable

    def _provider(self, target: str) -> Provider:
        if target not in self.providers:
            raise ProviderError(target, self.unavailable.get(target, "not a cloud target of this router"), 503,
                                retryable=False)
        return self.providers[target]

    async def chat(self, target: str, request: dict[str, Any]) -> dict[str, Any]:
        return await self._provider(target).chat(request)

    async def stream(self, target: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._provider(target).stream(request):
            yield chunk

    # -- fine-tuning at the provider (the fine-tuning API's cloud jobs) ------------------------------

    def _fine_tuning_client(self, target: str):
        provider = self._provider(target)
        if not isinstance(provider, OpenAIProvider):
            raise ProviderError(target, "fine-tuning is offered for OpenAI and Azure OpenAI targets only", 400)
        return provider.client

    async def fine_tune_create(self, target: str, training: bytes, filename: str,
                               params: dict[str, Any]) -> dict[str, Any]:
        client = self._fine_tuning_client(target)
        model = next(t.model for t in self.config.targets if t.name == target)
        uploaded = await client.files.create(file=(filename, training), purpose="fine-tune")
        hyperparameters = {k: v for k, v in (params.get("hyperparameters") or {}).items() if v != "auto"}
        job = await client.fine_tuning.jobs.create(
            model=model, training_file=uploaded.id, suffix=params.get("suffix"), seed=params.get("seed"),
            **({"hyperparameters": hyperparameters} if hyperparameters else {}))
        return job.model_dump(mode="json")

    async def fine_tune_retrieve(self, target: str, provider_job_id: str) -> dict[str, Any]:
        return (await self._fine_tuning_client(target).fine_tuning.jobs.retrieve(provider_job_id)).model_dump(mode="json")

    async def fine_tune_cancel(self, target: str, provider_job_id: str) -> dict[str, Any]:
        return (await self._fine_tuning_client(target).fine_tuning.jobs.cancel(provider_job_id)).model_dump(mode="json")


