"""The gateway: what serves the OpenAI routes, and the two Serve deployments that host it.

``Gateway`` wires the collaborators once: it wraps the DeploymentHandles it is given as the backends of
an ``OpenAIService`` (every call with a deadline, so a stuck replica cannot hang a request), builds the
one ``SpendRecorder`` and ``Auth`` over the ledger, and serves the FastAPI app that ``routes.build_api``
builds over them. ``GatewayDeployment`` hosts it on its own; ``LLMGatewayDeployment`` hosts it inside
an LLM replica (``gateway.host_llm``), where the hosted model is called in-process (``InProcessLLM``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from ray_app.accounting.keys import KeyStore
from ray_app.accounting.ledger import Ledger
from ray_app.accounting.limits import RateWindows
from ray_app.accounting.recorder import CloudPrice, SpendRecorder
from ray_app.datasets.capture import CaptureLog
from ray_app.documents.embedder import Embeddings
from ray_app.router.service import RouterService
from ray_app.serve.adapters import catalog_for
from ray_app.serve.auth import Auth
from ray_app.serve.config import AppConfig
from ray_app.serve.dispatch import LLMBackend
from ray_app.serve.documents_api import DocumentsService
from ray_app.serve.errors import UpstreamTimeoutError
from ray_app.serve.internals import sanitize_chat_request
from ray_app.serve.llm import LLMDeployment
from ray_app.serve.openai_api import OpenAIService
from ray_app.serve.protocol import ModelCard
from ray_app.serve.routes import HealthReport, build_api
from ray_app.serve.serve_status import ServeStatusReader, health_from_status
from ray_app.serve.system import system_status

logger = logging.getLogger("ray_app.gateway")


async def within(response: DeploymentResponse, timeout_s: float, what: str) -> Any:
    """A handle call's result, or 504 after ``timeout_s`` (the call is cancelled on the replica)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await response
    except TimeoutError:
        response.cancel()
        raise UpstreamTimeoutError(f"{what} did not answer within {timeout_s:g} s") from None


class HandleLLM:
    """An ``LLMBackend`` over a ray.serve.llm LLMServer deployment, streaming through the handle."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle.options(stream=True)

    def chat(self, request):
        return self._for(request.model).chat.remote(sanitize_chat_request(request))

    def completions(self, request):
        return self._for(request.model).completions.remote(request)

    def _for(self, model_id: str) -> DeploymentHandle:
        # an adapter id is Serve's multiplexed model id: routed to a replica that has it loaded
        return self._handle.options(multiplexed_model_id=model_id) if ":" in model_id else self._handle


class HandleEmbedder:
    def __init__(self, handle: DeploymentHandle, timeout_s: float):
        self._handle, self._timeout_s = handle, timeout_s

    async def embed(self, texts: list[str]) -> Embeddings:
        return await within(self._handle.embed.remote(texts), self._timeout_s, "the embedder")


class HandleKnowledge:
    """A ``KnowledgeBackend`` over the Knowledge deployment."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, upload_timeout_s: float):
        self._handle, self._timeout_s, self._upload_timeout_s = handle, timeout_s, upload_timeout_s

    def _call(self, method: str, *args, timeout_s: float | None = None):
        return within(getattr(self._handle, method).remote(*args), timeout_s or self._timeout_s, "the knowledge base")

    async def retrieve(self, query, options):
        return await self._call("retrieve", query, options)

    async def augment(self, messages, options):
        return await self._call("augment", messages, options)

    async def ingest_file(self, collection, filename, data, sensitivity):
        return await self._call("ingest_file", collection, filename, data, sensitivity,
                                timeout_s=self._upload_timeout_s)

    async def collections(self):
        return await self._call("collections")

    async def create_collection(self, name, default_sensitivity, embedder):
        return await self._call("create_collection", name, default_sensitivity, embedder)

    async def drop_collection(self, name):
        return await self._call("drop_collection", name)

    async def delete_document(self, collection, doc_id):
        return await self._call("delete_document", collection, doc_id)

    async def documents(self, collection, limit, after):
        return await self._call("documents", collection, limit, after)


class HandleCloud:
    """A ``CloudBackend`` over the Router deployment."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._stream = handle.options(stream=True)

    async def chat(self, target, request):
        return await self._handle.chat.remote(target, request)

    def stream(self, target, request):
        return self._stream.stream.remote(target, request)

    async def deployed(self) -> dict[str, str | None]:
        return await self._handle.deployed.remote()

    # a ``CloudFineTuner``: fine-tuning jobs at the provider, with the Router replica's credentials
    async def create(self, target, training, filename, params):
        return await self._handle.fine_tune_create.remote(target, training, filename, params)

    async def retrieve(self, target, provider_job_id):
        return await self._handle.fine_tune_retrieve.remote(target, provider_job_id)

    async def cancel(self, target, provider_job_id):
        return await self._handle.fine_tune_cancel.remote(target, provider_job_id)


class HandleOCR:
    def __init__(self, handle: DeploymentHandle, timeout_s: float):
        self._handle, self._timeout_s = handle, timeout_s

    async def recognize(self, filename, data):
        return await within(self._handle.recognize.remote(filename, data), self._timeout_s, "OCR")


class InProcessStream:
    """An ``LLMStream`` over a call into the LLMServer of this very process: what a handle call would
    return, without the hop. ``cancel`` closes the engine's generator, which aborts its request."""

    def __init__(self, start):
        self._start = start  # a coroutine: LLMServer.chat/completions return their generator when awaited
        self._started = False
        self._items = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._items is None:
            self._started = True
            self._items = await self._start
        return await anext(self._items)

    def cancel(self) -> None:
        if not self._started:
            self._start.close()  # never awaited: nothing reached the engine
        elif self._items is not None:
            asyncio.get_running_loop().create_task(_close(self._items))
        # else the task awaiting the call is being cancelled, and that cancellation reaches the engine


async def _close(items) -> None:
    try:
        await items.aclose()
    except RuntimeError:  # still running in a task that is being cancelled: that cancellation aborts it
        pass


class InProcessLLM:
    """An ``LLMBackend`` over the ``LLMServer`` this gateway shares its process with: the hosted model's
    requests and tokens never leave the replica. A pinned adapter id is loaded on this replica first."""

    def __init__(self, server, model: str):
        self._server, self._model = server, model

    def chat(self, request):
        return InProcessStream(self._call(self._server.chat, request))

    def completions(self, request):
        return InProcessStream(self._call(self._server.completions, request))

    async def _call(self, method, request):
        if request.model != self._model:
            from ray_app.serve.internals import load_adapter

            await load_adapter(self._server, request.model)
        return await method(request)


class Gateway:
    """Everything behind the OpenAI routes, wired once: keys and the ledger, the spend recorder, the
    router's decision, Serve's status, fine-tuning jobs, and the FastAPI app over them. Plain: the two
    Serve deployments below host it, one on its own and one inside an LLM replica."""

    def __init__(self, *, config: AppConfig, app_name: str, deployment: str, llms: dict[str, LLMBackend],
                 engine_queues: dict[str, Callable[[], Awaitable[int]]], deployments: dict[str, str],
                 embedders: dict[str, DeploymentHandle], cards: dict[str, ModelCard],
                 knowledge: DeploymentHandle | None = None, ocr: DeploymentHandle | None = None,
                 router: DeploymentHandle | None = None):
        self.config, self.deployment = config, deployment
        gw = config.gateway
        ledger_path = config.auth.ledger_file(config.paths)
        windows = RateWindows(config.auth.default_rpm, config.auth.default_tpm)
        self.auth = Auth(config.auth, KeyStore(ledger_path), windows)
        router_config = config.router.load(config.paths.root) if config.router is not None else None
        self.router = RouterService(router_config) if router_config is not None else None
        self._cloud = HandleCloud(router) if router is not None else None
        self.ledger = Ledger(ledger_path)
        cloud_prices = {t.name: CloudPrice(t.price_in_per_mtok, t.price_out_per_mtok)
                        for t in (router_config.targets if router_config else []) if t.kind != "local"}
        replicas = {m.name: m.replicas.num_replicas or m.replicas.autoscaling_config.min_replicas or 1
                    for m in config.llms + config.embedders}
        recorder = SpendRecorder(config.auth, self.ledger, local_rates=router_config.local_rates() if router_config
                                 else {}, cloud_prices=cloud_prices, replicas=replicas, windows=windows)
        watched = deployments | {name: h.deployment_name for name, h in embedders.items()}
        if router is not None:
            watched["router"] = router.deployment_name
        self.status = ServeStatusReader(app_name, config, watched)
        self._engine_queues = engine_queues
        self.service = OpenAIService(
            llms=llms,
            embedders={name: HandleEmbedder(h, gw.backend_timeout_s) for name, h in embedders.items()},
            cards=cards,
            recorder=recorder,
            router=self.router,
            cloud=self._cloud,
            documents=DocumentsService(
                knowledge=HandleKnowledge(knowledge, gw.backend_timeout_s, gw.upload_timeout_s) if knowledge else None,
                ocr_backend=HandleOCR(ocr, gw.upload_timeout_s) if ocr else None),
            adapters={m.name: catalog_for(m.name, m.adapters, str(config.paths.root))
                      for m in config.llms if m.adapters is not None},
            timeout_s=gw.request_timeout_s,
            unavailable=self.status.unavailable,
            capture=CaptureLog(config.paths.root / "captures"),
            log_requests=gw.log_requests,
        )
        self.fine_tuning = self._fine_tuning(router_config) if config.fine_tuning is not None else None
        self._route_limits = {}
        if config.ocr is not None:
            self._route_limits["/v1/ocr"] = config.ocr.max_request_bytes
        if config.knowledge is not None:
            self._route_limits["/v1/collections"] = config.knowledge.max_upload_bytes
        logger.info("%s (ledger %s)", self.auth.describe(), ledger_path)

    def _fine_tuning(self, router_config):
        from ray_app.fine_tuning.files import FileStore
        from ray_app.fine_tuning.jobs import FineTuningService, JobStore, LocalModel
        from ray_app.fine_tuning.runners import RayJobRunner
        from ray_app.router.privacy import training_file_reasons
        from ray_app.serve.internals import dashboard_url

        settings, root = self.config.fine_tuning.load(), self.config.paths.root
        cloud = {}
        for t in router_config.targets if router_config is not None else []:
            if t.kind in ("openai", "azure"):
                cloud |= {t.name: t.name, t.model: t.name}
        return FineTuningService(
            FileStore(root / "files", settings.max_file_bytes), JobStore(root / "fine_tuning" / "jobs.sqlite"),
            root=root / "fine_tuning", data_dir=str(root),
            models={m.name: LocalModel(m.name, m.source, m.adapters is not None,
                                       m.tools.chat_template if m.tools else None) for m in self.config.llms},
            template=settings.template, runner=RayJobRunner(dashboard_url), cloud_models=cloud, cloud=self._cloud,
            privacy_reasons=training_file_reasons, max_running=settings.max_running, promote=settings.promote)

    async def _move_fine_tuning_jobs(self) -> None:
        while True:
            try:
                await self.fine_tuning.tick()
            except Exception:  # a job's runner or provider unreachable for a moment: try again next tick
                logger.exception("fine-tuning jobs: tick failed")
            await asyncio.sleep(3)

    async def health(self) -> HealthReport:
        report = health_from_status(await self.status.read(), self.status.app_name)
        if self.router is not None and report.ready:
            # a failing cloud target is reported, but does not make the app unready: the router routes around it
            report.targets = self.router.health_report()
        return report

    def _adapter_registries(self) -> list:
        """One opener per distinct registry the served adapters come from (opened on first use)."""
        catalogs = {c.registry_uri: c for c in self.service.adapters.values()}
        return [lambda c=c: c.registry for c in catalogs.values()]

    async def system_status(self) -> dict:
        async def models() -> list[dict]:
            return [card.model_dump() for card in (await self.service.list_models()).data]

        return await system_status(models, self._engine_queues) | {
            "dashboard_url": self.config.gateway.dashboard_url,
            "gateway": {"deployment": self.deployment, "host_llm": self.config.gateway.host_llm}}

    async def _learn_cloud_targets(self) -> None:
        # Which cloud targets have credentials is known in the Router replica (its environment); until
        # it answers, routes use local targets only.
        while True:
            try:
                self.router.set_deployed(await within(self._cloud.deployed(), 30, "the Router deployment"))
                return
            except Exception as e:  # the Router replica is starting or restarting
                logger.info("waiting for the Router deployment: %s", type(e).__name__)
                await asyncio.sleep(2)

    def asgi_app(self):
        """The FastAPI app, with the background work it needs started on the running loop."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.status.poll())]
        if self._cloud is not None and self.router is not None:
            self._tasks.append(loop.create_task(self._learn_cloud_targets()))
        if self.fine_tuning is not None:
            self._tasks.append(loop.create_task(self._move_fine_tuning_jobs()))
        return build_api(self.service, self.config.gateway, self.health, self._route_limits, self.system_status,
                         auth=self.auth, ledger=self.ledger, fine_tuning=self.fine_tuning,
                         adapter_registries=self._adapter_registries())


def _handle_parts(llms: dict[str, DeploymentHandle]) -> dict[str, Any]:
    return {"llms": {name: HandleLLM(h) for name, h in llms.items()},
            "engine_queues": {name: h.num_unfinished_requests.remote for name, h in llms.items()},
            "deployments": {name: h.deployment_name for name, h in llms.items()}}


@serve.ingress()
class GatewayDeployment:
    """The gateway as a deployment of its own: every model is a handle call away."""

    def __init__(self, *, config: AppConfig, llms: dict[str, DeploymentHandle], **parts):
        context = serve.get_replica_context()
        self.gateway = Gateway(config=config, app_name=context.app_name, deployment=context.deployment,
                               **_handle_parts(llms), **parts)

    async def __serve_build_asgi_app__(self):
        return self.gateway.asgi_app()


class LLMGatewayDeployment(LLMDeployment):
    """An LLM replica that hosts the gateway too (``gateway.host_llm``): the hosted model's requests
    are served in this process, as ``vllm serve`` serves them, so its tokens cross no Serve hop (with
    HAProxy in front, none at all); other models are a handle call away. The price: the gateway
    scales, and restarts, with this model's replicas."""

    async def __init__(self, llm_config, *, config: AppConfig, llms: dict[str, DeploymentHandle],
                       adapters: dict | None = None, data_dir: str | None = None, **parts):
        await super().__init__(llm_config, adapters=adapters, data_dir=data_dir)
        context = serve.get_replica_context()
        own = _handle_parts(llms)
        own["llms"][llm_config.model_id] = InProcessLLM(self, llm_config.model_id)
        own["engine_queues"][llm_config.model_id] = self.num_unfinished_requests
        own["deployments"][llm_config.model_id] = context.deployment
        self.gateway = Gateway(config=config, app_name=context.app_name, deployment=context.deployment, **own,
                               **parts)

    async def __serve_build_asgi_app__(self):
        return self.gateway.asgi_app()
