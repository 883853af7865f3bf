"""``build_app``: the one builder of the Serve graph (``import_path: ray_app.serve.app:build_app``).

It validates the whole config (schema, model sources, engine arguments) before any deployment is
created or any weights load, reports every problem at once, then composes the deployments the
config asks for and binds them into the gateway: a deployment of its own, or the replicas of the LLM
named by ``gateway.host_llm``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ray import serve

from ray_app.documents.config import OCRConfig
from ray_app.models.resolve import ModelSourceError, resolve_source
from ray_app.serve import INGRESS_ENV
from ray_app.serve.config import AppConfig, ConfigError, LLMConfigModel
from ray_app.serve.embedder import build_embedder_deployment
from ray_app.serve.gateway import GatewayDeployment, LLMGatewayDeployment
from ray_app.serve.knowledge import build_knowledge_deployment
from ray_app.serve.llm import build_llm_app
from ray_app.serve.ocr import build_ocr_deployment
from ray_app.serve.protocol import ModelCard
from ray_app.serve.router import CloudProviders


def engine_kwargs_problems(engine_kwargs: dict[str, Any]) -> list[str]:
    """What vLLM will refuse in ``engine_kwargs``: unknown keys, and nested configs that do not validate.

    Checked here, before any replica starts, because the replica would only fail minutes later.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs

    from ray_app.serve.internals import normalize_engine_kwargs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    problems = [f"unknown vLLM engine argument {key!r}" for key in sorted(set(engine_kwargs) - known)]
    try:
        # the same normalisation the replica applies to dict-valued configs
        normalize_engine_kwargs({k: v for k, v in engine_kwargs.items() if k in known})
    except ValueError as e:
        problems.append(str(e).splitlines()[0] + ": " + " ".join(str(e).splitlines()[1:3]))
    return problems


def resolve_sources(config: AppConfig) -> dict[str, str]:
    """Model name -> loadable source for every configured model (and the reranker, under the key
    ``knowledge.reranker``); raises one ``ConfigError`` for all problems."""
    sources, problems = {}, []
    if config.knowledge is not None and config.knowledge.reranker:
        try:
            sources["knowledge.reranker"] = resolve_source(config.knowledge.reranker, config.paths)
        except ModelSourceError as e:
            problems.append(f"knowledge.reranker: {e}")
    for section, models in (("llms", config.llms), ("embedders", config.embedders)):
        for i, model in enumerate(models):
            try:
                sources[model.name] = resolve_source(model.source, config.paths)
            except ModelSourceError as e:
                problems.append(f"{section}.{i}.source: {e}")
    for i, llm in enumerate(config.llms):
        problems += [f"llms.{i}.engine_kwargs: {p}" for p in engine_kwargs_problems(llm.engine_kwargs)]
        if llm.tools is not None:
            problems += [f"llms.{i}.tools.{p}" for p in llm.tools.problems()]
    if problems:
        raise ConfigError("serve config args", problems)
    return sources


def _max_model_len(llm: LLMConfigModel, source: str) -> int | None:
    if "max_model_len" in llm.engine_kwargs:
        return int(llm.engine_kwargs["max_model_len"])
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("max_position_embeddings")
    return None


def model_cards(config: AppConfig, sources: dict[str, str]) -> dict[str, ModelCard]:
    cards = {m.name: ModelCard(id=m.name, root=m.source, kind="llm", max_model_len=_max_model_len(m, sources[m.name]),
                               tool_calling=None if m.tools is None else "auto" if m.tools.auto_tool_choice else "required")
             for m in config.llms}
    cards |= {e.name: ModelCard(id=e.name, root=e.source, kind="embedding") for e in config.embedders}
    return cards


def build_app(args: dict[str, Any]) -> serve.Application:
    config = AppConfig.load(args)
    sources = resolve_sources(config)
    router_config = load_router_config(config) if config.router is not None else None
    fine_tuning = config.fine_tuning.load() if config.fine_tuning is not None else None
    # Paths are made absolute and the router and fine-tuning configs inlined here, on the machine that
    # builds the app, so every replica reads the same ledger and the same settings wherever it runs.
    config = config.model_copy(update={
        "auth": config.auth.model_copy(update={"ledger_path": str(config.auth.ledger_file(config.paths))}),
        "data_dir": str(config.paths.root),
        "router": None if router_config is None else config.router.model_copy(
            update={"config": router_config.model_dump(mode="json")}),
        "fine_tuning": None if fine_tuning is None else config.fine_tuning.model_copy(
            update={"config": fine_tuning.model_dump(mode="json")}),
    })
    host = config.gateway.host_llm
    llms = {m.name: build_llm_app(m, sources[m.name], str(config.paths.root)) for m in config.llms if m.name != host}
    embedders = {e.name: build_embedder_deployment(e, sources[e.name]) for e in config.embedders}
    ocr = build_ocr_deployment(config.ocr) if config.ocr is not None else None
    knowledge = None
    if config.knowledge is not None:
        embedder = config.embedder_config(config.knowledge.embedder)
        knowledge = build_knowledge_deployment(
            config.knowledge, str(config.paths.root), embedder.source, sources[embedder.name],
            embedders[embedder.name], ocr, config.ocr.ocr if config.ocr else OCRConfig(),
            sources.get("knowledge.reranker"))
    router = None
    if router_config is not None:
        router = (serve.deployment(CloudProviders).options(name="Router", **config.router.replicas.serve_options())
                  .bind(router_config))
    parts = {"config": config, "llms": llms, "embedders": embedders, "cards": model_cards(config, sources),
             "knowledge": knowledge, "ocr": ocr, "router": router}
    if host is not None:
        model = next(m for m in config.llms if m.name == host)
        model = model.model_copy(update={"env": INGRESS_ENV | model.env})
        return build_llm_app(model, sources[host], str(config.paths.root), serve.ingress()(LLMGatewayDeployment),
                             **parts)
    options = config.gateway.replicas.serve_options()
    options["ray_actor_options"]["runtime_env"] = {"env_vars": INGRESS_ENV}
    return serve.deployment(GatewayDeployment).options(name="Gateway", **options).bind(**parts)


def load_router_config(config: AppConfig):
    """The router config, checked against the served models: local targets must name one, and no
    route may shadow one (``model`` picks either)."""
    router = config.router.load(config.paths.root)
    served = {m.name for m in config.llms} | {e.name for e in config.embedders}
    problems = [f"router target {t.name!r}: model {t.model!r} is not one of the served llms "
                f"{sorted(m.name for m in config.llms)}"
                for t in router.targets if t.kind == "local" and t.model not in {m.name for m in config.llms}]
    problems += [f"router route {r!r} has the name of a served model; rename one" for r in router.routes if r in served]
    with_tools = {m.name for m in config.llms if m.tools is not None}
    problems += [f"router target {t.name!r} lists the `tools` capability but model {t.model!r} has no `tools:` "
                 "in its llms entry" for t in router.targets
                 if t.kind == "local" and "tools" in t.capabilities
                 and t.model in {m.name for m in config.llms} - with_tools]
    if problems:
        raise ConfigError("serve config args: router", problems)
    return router
