"""The gateway's handle wrappers: every call to another deployment has a deadline, and a 500 never
echoes what failed inside."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ray_app.serve.errors import UpstreamTimeoutError, from_deployment_failure, internal_error
from ray_app.serve.gateway import HandleEmbedder, HandleKnowledge, within


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
