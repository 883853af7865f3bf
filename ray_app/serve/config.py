"""The typed schema of the serving application: the ``args`` of ``serve_config.yaml``.

``AppConfig`` is the single source of truth for the Serve graph. ``build_app`` validates the YAML
against it before any deployment is created or any weights load, and reports every problem at once.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from ray.serve.config import AutoscalingConfig

from ray_app.accounting.config import AuthConfig
from ray_app.documents.config import ChunkingConfig, DocumentLimits, OCRConfig, StoreConfig
from ray_app.paths import DataDir
from ray_app.schema import ConfigError, Strict, load_yaml, parse
from ray_app.sensitivity import Sensitivity
from ray_app.templates import shipped, template_path

if TYPE_CHECKING:
    from ray_app.router.config import RouterConfig

__all__ = ["AppConfig", "ConfigError", "EmbedderConfigModel", "GatewayConfig", "LLMConfigModel", "ReplicaSettings",
           "load_serve_config"]

# Model names travel in URLs and Serve deployment names; `:` separates base model and adapter.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


class ReplicaSettings(Strict):
    """How many replicas of a deployment run, and what each one asks the cluster for."""

    num_replicas: PositiveInt | None = Field(1, description="Fixed replica count; leave unset to autoscale.")
    autoscaling_config: AutoscalingConfig | None = Field(
        None, description="Ray Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...)."
    )
    max_ongoing_requests: PositiveInt = Field(64, description="Requests a replica handles at once.")
    num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per replica actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica actor.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. to land on a worker group."
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ReplicaSettings":
        if self.autoscaling_config is not None and "num_replicas" in self.model_fields_set:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for ``serve.deployment(...)``/``.options(...)``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options(),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_unset=True)
        else:
            options["num_replicas"] = self.num_replicas
        return options


class GatewayConfig(Strict):
    """The FastAPI ingress with the OpenAI routes."""

    max_request_bytes: PositiveInt = Field(2 * 1024 * 1024, description="Larger request bodies get 413.")
    request_timeout_s: PositiveFloat = Field(600.0, description="Server-side limit for one request.")
    cors_allow_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS.")
    status_poll_interval_s: PositiveFloat = Field(
        1.0, description="How often the gateway reads deployment status (503 for models with no running replica)."
    )
    backend_timeout_s: PositiveFloat = Field(
        60.0, description="Deadline of a call to the embedder or the knowledge base (retrieval, listings); 504 after.")
    upload_timeout_s: PositiveFloat = Field(
        900.0, description="Deadline of an upload's indexing and of an OCR request; 504 after.")
    console: bool = Field(True, description="Serve the web console at /ui (static files; the API's keys apply).")
    log_requests: bool = Field(
        False, description="A usage line per request in the replica's log (tokens, TTFT, total time), like vLLM's "
                           "--enable-log-requests. Off, the ledger and the metrics still count every request and "
                           "Ray Serve's access log names each one; on, each line costs the replica's event loop "
                           "about 5% in a burst of short requests, before each request's [DONE].")
    dashboard_url: str | None = Field(
        None, description="The Ray dashboard the console links to; default: port 8265 of the host serving the console.")
    host_llm: str | None = Field(
        None, description="An `llms` name whose replicas host the gateway: that model's requests are served in "
                          "the process that runs its engine, with no hop between deployments (as `vllm serve` "
                          "serves them); the gateway then scales and restarts with that model's replicas. "
                          "Unset: the gateway is a deployment of its own and every model is a handle call away.")
    replicas: ReplicaSettings = Field(
        default_factory=lambda: ReplicaSettings(num_cpus=0.25),
        description="The gateway's own deployment (not used with `host_llm`: the hosting model's replicas serve).")


class AdapterServeSettings(Strict):
    """LoRA adapters on one served base model, loaded at request time (no restart)."""

    max_per_replica: PositiveInt = Field(4, description="Adapters kept loaded per replica (LRU); vLLM's max_loras.")
    max_rank: PositiveInt = Field(16, description="Largest LoRA rank accepted (vLLM's max_lora_rank).")
    registry_uri: str | None = Field(
        None, description="MLflow registry with the adapter lines; default sqlite under the data directory.")
    local: dict[str, str] = Field(default_factory=dict, description="Adapters by name -> local PEFT folder.")
    refresh_s: float = Field(5.0, ge=0, description="How long a name -> version lookup is cached by the gateway.")


class ToolCallingSettings(Strict):
    """Tool calling on one served LLM: the chat template shows the model the tools, vLLM's tool-call
    parser reads its calls back out of the text, and named or ``required`` choices are decoded
    against the tool's JSON schema (vLLM's structured outputs)."""

    parser: str = Field(
        "hermes", description="vLLM's tool-call parser for the model's format: hermes (<tool_call> JSON blocks, "
                              "what the smollm2-tools template teaches), llama3_json, mistral, qwen3_xml, ...")
    auto_tool_choice: bool = Field(
        True, description="Let the model decide (`tool_choice: auto`, the default when a request has tools); "
                          "false: only `none`, `required` and a named function.")
    chat_template: str | None = Field(
        None, description="A chat template that renders `tools`: one shipped in ray_app/templates by name "
                          "(smollm2-tools) or a .jinja file; unset: the model's own template.")
    strict: Literal["auto", "function", "parameter"] = Field(
        "parameter", description="What the grammar pins (vLLM's tool_strict_level): parameter: calls and their "
                                 "arguments match the tools' JSON schemas; function: the call envelope only; auto: "
                                 "arguments only of tools marked `strict: true`.")

    def template_file(self) -> Path | None:
        return None if self.chat_template is None else template_path(self.chat_template)

    def problems(self) -> list[str]:
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        problems = [] if self.parser in known else [f"parser {self.parser!r} is not one of vLLM's: {', '.join(known)}"]
        template = self.template_file()
        if template is not None and not template.is_file():
            problems.append(f"chat_template {self.chat_template!r}: no such file and not a shipped template "
                            f"({', '.join(shipped())})")
        return problems

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM's frontend arguments; ray.serve.llm hands them to its OpenAI serving layer. The template
        goes as text, so a replica on another node needs no file."""
        kwargs: dict[str, Any] = {"tool_call_parser": self.parser, "enable_auto_tool_choice": self.auto_tool_choice,
                                  "tool_strict_level": self.strict}
        if (template := self.template_file()) is not None:
            kwargs["chat_template"] = template.read_text()
        return kwargs


class LLMConfigModel(Strict):
    """One served LLM: a ``ray.serve.llm`` LLMServer deployment over vLLM."""

    name: str = Field(description="The model id clients send as `model`.")
    source: str = Field(
        description="A prepared model name (see `ray-app models list`), a local folder, or a Hugging Face id."
    )
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where the engine runs.")
    accelerator_type: str | None = Field(None, description="GPU type to land on, e.g. L4, A10G, H100.")
    engine_cpus: PositiveFloat = Field(1.0, description="Logical CPUs in each engine worker's bundle.")
    cpu_kv_cache_gib: PositiveFloat = Field(
        2.0, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE); ignored on GPU."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM engine arguments (dtype, max_model_len, tensor_parallel_size, ...)."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for the engine.")
    stream_batching_interval_ms: float | None = Field(
        None, ge=0,
        description="How long a replica gathers stream chunks before sending them on (ray.serve.llm's default "
                    "is 50 ms). Batching saves per-chunk overhead at thousands of tokens/s; it adds up to this "
                    "much to time-to-first-token. 0 sends every chunk at once.",
    )
    adapters: AdapterServeSettings | None = Field(
        None, description="Serve LoRA adapters of this model (`model=\"<name>:<adapter>\"`); unset: none.")
    tools: ToolCallingSettings | None = Field(
        None, description="Tool calling (`tools`, `tool_choice` on chat); unset: requests with tools get 400.")
    replicas: ReplicaSettings = Field(default_factory=ReplicaSettings)

    @model_validator(mode="after")
    def _check(self) -> "LLMConfigModel":
        if not _NAME.match(self.name) or ":" in self.name:
            raise ValueError(f"name {self.name!r}: use letters, digits and . _ / - (no ':')")
        if self.accelerator == "cpu" and self.engine_kwargs.get("dtype") in ("bfloat16", "half", "float16"):
            raise ValueError(
                f"engine_kwargs.dtype={self.engine_kwargs['dtype']!r} on CPU: use float32 "
                "(bfloat16 without AVX512-bf16 is slow and was seen to produce degenerate text)"
            )
        return self

    def engine_env(self) -> dict[str, str]:
        env = {"HF_HUB_DISABLE_TELEMETRY": "1"}
        if self.accelerator == "cpu":
            env |= {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": f"{self.cpu_kv_cache_gib:g}"}
        return env | self.env


class EmbedderConfigModel(Strict):
    """One served sentence-transformers embedder."""

    name: str = Field(description="The model id clients send as `model` to /v1/embeddings.")
    source: str = Field(description="A prepared model name, a local folder, or a Hugging Face id.")
    max_batch_size: PositiveInt = Field(32, description="Texts encoded together (Serve @serve.batch).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")
    num_threads: PositiveInt | None = Field(1, description="torch threads per replica; unset lets torch choose.")
    replicas: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings(num_cpus=0.5))

    @model_validator(mode="after")
    def _check(self) -> "EmbedderConfigModel":
        if not _NAME.match(self.name) or ":" in self.name:
            raise ValueError(f"name {self.name!r}: use letters, digits and . _ / - (no ':')")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.replicas.num_gpus > 0 else "cpu"


class OCRServeConfig(Strict):
    """The OCR deployment behind ``POST /v1/ocr`` (and OCR of uploaded scans)."""

    ocr: OCRConfig = Field(default_factory=OCRConfig)
    max_request_bytes: PositiveInt = Field(20 * 1024 * 1024, description="Largest image or PDF accepted.")
    limits: DocumentLimits = Field(default_factory=DocumentLimits, description="Pages, pixels and frames per file.")
    concurrency: PositiveInt = Field(1, description="Tesseract processes a replica runs at once.")
    replicas: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings(num_cpus=0.25))


class KnowledgeConfig(Strict):
    """The knowledge-base deployment: retrieval (``/v1/retrieve``, ``rag`` on chat), uploads, collections.

    Chunking, OCR and the embedder must match the ingest config (``configs/ingest.yaml``) so a file
    uploaded here and the same file ingested by ``ray-app ingest`` are recognised as one document.
    """

    embedder: str = Field(description="Name of the `embedders` entry that embeds queries and uploads.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    top_k: int = Field(5, ge=1, le=100, description="Passages retrieved when a request does not say.")
    max_context_chars: PositiveInt = Field(
        4000, description="Characters of retrieved text put in front of a chat (fits SmolLM2's 2k context).")
    max_upload_bytes: PositiveInt = Field(50 * 1024 * 1024)
    limits: DocumentLimits = Field(default_factory=DocumentLimits, description="Pages, pixels, frames, inflated size.")
    embed_batch: PositiveInt = Field(
        16, description="Chunks of an upload embedded per call, so queries get the embedder between batches.")
    default_sensitivity: Sensitivity = "internal"
    reranker: str | None = Field(None, description="A cross-encoder model source; unset: no reranking.")
    replicas: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings(num_cpus=0.25))


class RouterServeConfig(Strict):
    """The smart router (``model: auto`` or another route name)."""

    config: str | dict[str, Any] = Field(
        "configs/router.yaml",
        description="A router config file (ray_app.router.config.RouterConfig), relative to where the app is "
                    "built, or the same document inline.")
    # No CPU reserved: the router waits on I/O and decides in microseconds, and a laptop's two CPUs are
    # already spoken for by the engine and the other replicas (a reservation here left the Gateway unplaced).
    replicas: ReplicaSettings = Field(default_factory=lambda: ReplicaSettings(num_cpus=0.0))

    def load(self, data_dir: Path | None = None) -> "RouterConfig":
        """The validated router config (a file is read where the app is built; ``build_app`` inlines it)."""
        from ray_app.router.config import RouterConfig

        if isinstance(self.config, dict):
            return RouterConfig.parse(self.config, "router.config")
        return RouterConfig.load(self.config)


class FineTuningServeConfig(Strict):
    """OpenAI's files and fine-tuning jobs API (``/v1/files``, ``/v1/fine_tuning/jobs``)."""

    config: str | dict[str, Any] = Field(
        "configs/fine_tuning.yaml", description="A fine-tuning config file (ray_app.fine_tuning.config."
                                                "FineTuningConfig), relative to where the app is built, or inline.")

    def load(self):
        from ray_app.fine_tuning.config import FineTuningConfig

        return FineTuningConfig.load(self.config)


class AppConfig(Strict):
    """The serving application (``args`` of the Serve config)."""

    data_dir: str | None = Field(
        None, description="Where prepared models live; default ./data or $RAY_APP_DATA_DIR."
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    llms: list[LLMConfigModel] = Field(default_factory=list)
    embedders: list[EmbedderConfigModel] = Field(default_factory=list)
    ocr: OCRServeConfig | None = Field(None, description="Serve OCR (/v1/ocr, scanned uploads); unset: no OCR.")
    knowledge: KnowledgeConfig | None = Field(None, description="Serve retrieval and RAG; unset: none.")
    router: RouterServeConfig | None = Field(None, description="The smart router; unset: none.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, budgets and the spend ledger.")
    fine_tuning: FineTuningServeConfig | None = Field(
        None, description="The files and fine-tuning jobs API; unset: none.")

    @model_validator(mode="after")
    def _check(self) -> "AppConfig":
        if not self.llms and not self.embedders:
            raise ValueError("configure at least one model under `llms` or `embedders`")
        names = [m.name for m in self.llms] + [e.name for e in self.embedders]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique across llms and embedders; repeated: {duplicates}")
        if (host := self.gateway.host_llm) is not None:
            if host not in {m.name for m in self.llms}:
                raise ValueError(f"gateway.host_llm {host!r} is not one of the configured llms "
                                 f"{[m.name for m in self.llms]}")
            if "replicas" in self.gateway.model_fields_set:
                raise ValueError(f"gateway.replicas does not apply with gateway.host_llm: the gateway runs in the "
                                 f"replicas of {host!r} (set them under its `llms` entry)")
        if self.knowledge is not None and self.knowledge.embedder not in {e.name for e in self.embedders}:
            raise ValueError(f"knowledge.embedder {self.knowledge.embedder!r} is not one of the configured "
                             f"embedders {[e.name for e in self.embedders]}")
        return self

    def embedder_config(self, name: str) -> EmbedderConfigModel:
        return next(e for e in self.embedders if e.name == name)

    @property
    def paths(self) -> DataDir:
        return DataDir.from_path(self.data_dir)

    @classmethod
    def load(cls, args: dict[str, Any], source: str = "serve config args") -> "AppConfig":
        return parse(cls, args, source)


def load_serve_config(path: str | Path) -> list[tuple[str, AppConfig]]:
    """Validate every ray_app application in a Serve config file: ``[(app name, AppConfig)]``."""
    path = Path(path)
    apps = load_yaml(path).get("applications") or []
    if not apps:
        raise ConfigError(str(path), ["no `applications:` list"])
    configs, problems = [], []
    for i, app in enumerate(apps):
        if not str(app.get("import_path", "")).startswith("ray_app."):
            continue
        try:
            configs.append((app.get("name", f"app{i}"), AppConfig.load(app.get("args") or {}, f"applications.{i}.args")))
        except ConfigError as e:
            problems += [f"applications.{i}.args.{p}" for p in e.problems]
    if problems:
        raise ConfigError(str(path), problems)
    if not configs:
        raise ConfigError(str(path), ["no application imports ray_app (import_path: ray_app.serve.app:build_app)"])
    return configs
