"""The gateway's backends: every call to another deployment has a deadline, a 500 never echoes what
failed inside, and the model a replica hosts is called in-process (adapters loaded there first)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ray_app.serve.errors import UpstreamTimeoutError, from_deployment_failure, internal_error
from ray_app.serve import internals
from ray_app.serve.gateway import HandleEmbedder, HandleKnowledge, InProcessLLM, within
from ray_app.serve.protocol import ChatCompletionRequest


class StuckResponse:
    """A DeploymentResponse whose replica never answers."""

    def __init__(self):
        self.cancelled = False

    def __await__(self):
        return asyncio.sleep(3600).__await__()

    def cancel(self):
        self.cancelled = True


class StuckHandle:
    def __init__(self):
        self.responses: list[StuckResponse] = []

    def __getattr__(self, method):
        handle = self

        class Method:
            def remote(self, *args):
                handle.responses.append(StuckResponse())
                return handle.responses[-1]

        return Method()


async def test_a_stuck_replica_times_out_and_its_call_is_cancelled():
    response = StuckResponse()
    with pytest.raises(UpstreamTimeoutError, match="the embedder did not answer within 0.05 s"):
        await within(response, 0.05, "the embedder")
    assert response.cancelled


async def test_embedder_and_knowledge_calls_have_deadlines():
    handle = StuckHandle()
    with pytest.raises(UpstreamTimeoutError):
        await HandleEmbedder(handle, 0.05).embed(["x"])
    knowledge = HandleKnowledge(handle, timeout_s=0.05, upload_timeout_s=0.1)
    for call in (knowledge.retrieve("q", None), knowledge.collections(), knowledge.ingest_file("c", "f", b"", None)):
        with pytest.raises(UpstreamTimeoutError):
            await call
    assert all(r.cancelled for r in handle.responses) and len(handle.responses) == 4


def test_a_500_names_an_error_id_not_the_exception(caplog):
    secret = "Traceback ... postgres://admin:hunter2@db/prod"
    with caplog.at_level(logging.ERROR, logger="ray_app.gateway"):
        error = from_deployment_failure(RuntimeError(secret), "knowledge")
    assert error.status_code == 500 and "hunter2" not in error.message and "RuntimeError" not in error.message
    error_id = error.message.split("error id ")[1].split(")")[0]
    assert error_id in caplog.text and "hunter2" in caplog.text  # the operator still sees it, under that id
    assert "hunter2" not in internal_error(ValueError(secret)).message


class Server:
    """An LLMServer's surface as ``InProcessLLM`` uses it (its engine's generator, returned when awaited)."""

    def __init__(self):
        self.calls: list[str] = []

    async def chat(self, request):
        self.calls.append(request.model)

        async def items():
            yield ["data: {}\n\n"]

        return items()


async def test_the_hosted_model_is_called_in_process_and_an_adapter_is_loaded_there_first(monkeypatch):
    loaded = []

    async def load_adapter(server, model_id):
        loaded.append(model_id)

    monkeypatch.setattr(internals, "load_adapter", load_adapter)
    server = Server()
    llm = InProcessLLM(server, "smol")
    for model in ("smol", "smol:support@3"):
        stream = llm.chat(ChatCompletionRequest(model=model, messages=[{"role": "user", "content": "hi"}]))
        assert [item async for item in stream] == [["data: {}\n\n"]]
    assert server.calls == ["smol", "smol:support@3"] and loaded == ["smol:support@3"]


async def test_an_in_process_stream_cancelled_before_it_started_never_runs():
    server = Server()
    stream = InProcessLLM(server, "smol").chat(
        ChatCompletionRequest(model="smol", messages=[{"role": "user", "content": "hi"}]))
    stream.cancel()
    assert server.calls == []
