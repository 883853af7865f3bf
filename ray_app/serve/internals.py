"""Every private or unstable name of Ray and vLLM that ray_app uses, imported here and nowhere else.

Each has no public equivalent in the pinned versions (Ray 2.60, vLLM 0.32); where one appears, use it
and drop the name from this module. ``tests/unit/test_internals.py`` imports all of them, so an upgrade
that moves or renames one fails there, loudly, instead of deep inside a replica.
"""

from __future__ import annotations

from typing import Any

# ray.serve.llm's ingress materialises pydantic's lazy iterators (tool_calls) before a chat request
# crosses a handle; a request that skips it fails to pickle.
from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request as sanitize_chat_request
# the normalisation an LLMServer replica applies to dict-valued engine arguments, to check them early
from ray.llm._internal.serve.engines.vllm.vllm_engine import _normalize_vllm_engine_kwargs as normalize_engine_kwargs
# ray.serve.llm's LoRA loading reads only cloud buckets; ours subclasses its loader
from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
# the error object an LLMServer yields: vLLM's (ray.serve.llm's public ErrorResponse subclasses it)
from vllm.entrypoints.serve.engine.protocol import ErrorResponse as EngineErrorResponse

__all__ = ["DiskMultiplexConfig", "EngineErrorResponse", "LoraModelLoader", "dashboard_auth_headers", "dashboard_url",
           "engine_unfinished_requests", "global_id_manager", "normalize_engine_kwargs", "sanitize_chat_request"]


def engine_unfinished_requests(server: Any) -> int:
    """Requests a ray.serve.llm LLMServer's vLLM engine still holds (running or waiting)."""
    return server.engine._engine_client.get_num_unfinished_requests()


def dashboard_url() -> str | None:
    """The Ray dashboard's URL as the cluster advertises it (None when it is not running)."""
    from ray._private.services import get_webui_url_from_internal_kv

    url = get_webui_url_from_internal_kv()
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"


def dashboard_auth_headers() -> dict[str, str]:
    """The headers Ray's own SDK sends to a token-authenticated dashboard."""
    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    return get_auth_headers_if_auth_enabled({})
