"""The ``Gateway`` deployment: the Serve ingress that hosts the OpenAI routes.

It is thin on purpose: it wraps the DeploymentHandles it is given as backends of an
``OpenAIService`` and serves the FastAPI app that ``routes.build_api`` builds over it.
"""

from __future__ import annotations

import asyncio

from ray import serve
from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request
from ray.serve._private.common import ReplicaState
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ServeStatus

from ray_app.embedder import Embeddings
from ray_app.serve.adapters import catalog_for
from ray_app.serve.config import AppConfig
from ray_app.serve.documents_api import DocumentsService
from ray_app.router.config import RouterConfig
from ray_app.serve.auth import Auth, current_caller
from ray_app.serve.openai_api import LLMStream, OpenAIService, UsageRecord, log_usage
from ray_app.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard
from ray_app.serve.routes import HealthReport, build_api
from ray_app.serve.system import system_status


class HandleLLM:
    """An ``LLMBackend`` over a ray.serve.llm LLMServer deployment, streaming through the handle."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle.options(stream=True)

    def chat(self, request: ChatCompletionRequest) -> LLMStream:
        # Pydantic leaves some message fields as unpicklable iterators; Ray's own ingress
        # materialises them the same way before crossing the handle.
        return self._for(request.model).chat.remote(_sanitize_chat_completion_request(request))

    def completions(self, request: CompletionRequest) -> LLMStream:
        return self._for(request.model).completions.remote(request)

    def _for(self, model_id: str) -> DeploymentHandle:
        # an adapter id is Serve's multiplexed model id: routed to a replica that has it loaded
        return self._handle.options(multiplexed_model_id=model_id) if ":" in model_id else self._handle


class HandleEmbedder:
    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def embed(self, texts: list[str]) -> Embeddings:
        return await self._handle.embed.remote(texts)


class HandleKnowledge:
    """A ``KnowledgeBackend`` over the Knowledge deployment."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def retrieve(self, query, options):
        return await self._handle.retrieve.remote(query, options)

    async def augment(self, messages, options):
        return await self._handle.augment.remote(messages, options)

    async def ingest_file(self, collection, filename, data, sensitivity):
        return await self._handle.ingest_file.remote(collection, filename, data, sensitivity)

    async def collections(self):
        return await self._handle.collections.remote()

    async def delete_document(self, collection, doc_id):
        return await self._handle.delete_document.remote(collection, doc_id)


class HandleRouter:
    """A ``RouterBackend`` over the Router deployment."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def chat(self, request, caller):
        return await self._handle.chat.remote(request, caller)

    def chat_stream(self, request, caller):
        return self._stream.chat_stream.remote(request, caller)

    async def health(self) -> dict:
        return await self._handle.health.remote()


class HandleOCR:
    def __init__(self, handle: DeploymentHandle):
        self._handle = handle

    async def recognize(self, filename, data):
        return await self._handle.recognize.remote(filename, data)


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


def health_from_status(status: ServeStatus, app_name: str) -> HealthReport:
    """Ready only when the application and every one of its deployments is healthy."""
    app = status.applications.get(app_name)
    if app is None:
        return HealthReport(False, {}, f"application {app_name!r} is not deployed")
    deployments = {name: d.status.value for name, d in app.deployments.items()}
    unhealthy = {n: d.message for n, d in app.deployments.items() if d.status.value != "HEALTHY"}
    ready = app.status.value == "RUNNING" and not unhealthy
    detail = "; ".join(f"{n}: {m or deployments[n]}" for n, m in unhealthy.items())
    return HealthReport(ready, deployments, detail)


@serve.ingress()
class Gateway:
    def __init__(self, config: AppConfig, llms: dict[str, DeploymentHandle],
                 embedders: dict[str, DeploymentHandle], cards: dict[str, ModelCard],
                 knowledge: DeploymentHandle | None = None, ocr: DeploymentHandle | None = None,
                 router: DeploymentHandle | None = None, router_config: RouterConfig | None = None):
        self.config = config
        self.auth = Auth(router_config) if router_config is not None else None
        self._router = HandleRouter(router) if router is not None else None
        self.app_name = serve.get_replica_context().app_name
        self._deployments = {name: h.deployment_name for name, h in (llms | embedders).items()}
        self._llm_handles = llms
        self._scale_to_zero = {
            m.name for m in config.llms + config.embedders
            if m.replicas.autoscaling_config is not None and m.replicas.autoscaling_config.min_replicas == 0
        }
        self._status: ServeStatus | None = None
        self._refresh: asyncio.Future | None = None
        self.service = OpenAIService(
            llms={name: HandleLLM(h) for name, h in llms.items()},
            embedders={name: HandleEmbedder(h) for name, h in embedders.items()},
            cards=cards,
            timeout_s=config.gateway.request_timeout_s,
            unavailable=self._unavailable,
            documents=DocumentsService(knowledge=HandleKnowledge(knowledge) if knowledge else None,
                                       ocr_backend=HandleOCR(ocr) if ocr else None),
            adapters={m.name: catalog_for(m.name, m.adapters, str(config.paths.root))
                      for m in config.llms if m.adapters is not None},
            router=self._router,
            routes=frozenset(router_config.routes) if router_config is not None else frozenset(),
            caller=current_caller,
            on_usage=self._on_usage,
            on_routed=self.auth.on_routed if self.auth is not None else (lambda info: None),
        )
        self._route_limits = {}
        if config.ocr is not None:
            self._route_limits["/v1/ocr"] = config.ocr.max_request_bytes
        if config.knowledge is not None:
            self._route_limits["/v1/collections"] = config.knowledge.max_upload_bytes

    def _on_usage(self, record: UsageRecord) -> None:
        log_usage(record)
        if self.auth is not None:
            self.auth.on_usage(record)

    async def _unavailable(self, model: str) -> str | None:
        deployment, scales_to_zero = self._deployments[model], model in self._scale_to_zero
        if unavailable_reason(self._status, self.app_name, deployment, scales_to_zero) is None:
            return None
        # The snapshot may predate a replica that has just started: confirm before refusing.
        return unavailable_reason(await self._fresh_status(), self.app_name, deployment, scales_to_zero)

    async def _fresh_status(self) -> ServeStatus | None:
        # Concurrent refusals share one controller call, so an outage cannot flood the controller.
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._read_status())
        return await asyncio.shield(self._refresh)

    async def _read_status(self) -> ServeStatus | None:
        try:
            self._status = await asyncio.to_thread(serve.status)
        except Exception:  # the controller restarting is no reason to stop serving
            self._status = None
        return self._status

    async def _poll_status(self) -> None:
        # Off the request path: requests read the last snapshot, never wait for the controller.
        while True:
            await self._fresh_status()
            await asyncio.sleep(self.config.gateway.status_poll_interval_s)

    async def health(self) -> HealthReport:
        status = await asyncio.to_thread(serve.status)
        report = health_from_status(status, self.app_name)
        if self._router is not None and report.ready:
            # a failing cloud target is reported, but does not make the app unready: the router routes around it
            report.targets = await self._router.health()
        return report

    async def system_status(self) -> dict:
        async def models() -> list[dict]:
            return [card.model_dump() for card in (await self.service.list_models()).data]

        queues = {name: h.num_unfinished_requests.remote for name, h in self._llm_handles.items()}
        return await system_status(models, queues)

    async def __serve_build_asgi_app__(self):
        self._poller = asyncio.get_running_loop().create_task(self._poll_status())
        return build_api(self.service, self.config.gateway, self.health, self._route_limits, self.system_status,
                         auth=self.auth)
