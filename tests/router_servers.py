"""Loopback servers that speak the real wire protocols of the router's cloud providers.

``OpenAIServer`` serves OpenAI's chat completions (JSON and server-sent events), also under Azure's
``/openai/deployments/{deployment}/...`` path, and the files and fine-tuning jobs API (under ``/v1`` and
Azure's ``/openai``: a job is created ``validating_files``, reads ``running`` when next retrieved and ``succeeded``
after that, as a provider's would over some minutes); ``BedrockServer`` serves Bedrock's Converse and
ConverseStream, the latter in AWS's binary event-stream encoding, and insists on a SigV4 signature.
The real SDK clients (``openai``, ``boto3``) talk to them over HTTP on 127.0.0.1, so the providers'
request building and response parsing are exercised for real. Both record every request and can be
told to fail the next N requests.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

__all__ = ["BedrockServer", "LoopbackServer", "OpenAIServer", "RecordedRequest", "encode_event"]


@dataclass
class RecordedRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


class LoopbackServer:
    """A FastAPI app on 127.0.0.1 with an OS-chosen port, run by uvicorn in a daemon thread."""

    def __init__(self, reply: str = "Hello from the loopback server"):
        self.reply = reply
        self.requests: list[RecordedRequest] = []
        self._failures: list[int] = []
        self._lock = threading.Lock()
        self.app = FastAPI()
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("loopback server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self._failures += [status] * n

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._failures.clear()

    async def _record(self, request: Request) -> tuple[dict[str, Any], int | None]:
        """Record the request; return its body and the status to fail it with, if one is pending."""
        body = await request.json()
        with self._lock:
            self.requests.append(RecordedRequest(request.url.path, dict(request.query_params),
                                                 {k.lower(): v for k, v in request.headers.items()}, body))
            return body, (self._failures.pop(0) if self._failures else None)


def _words(text: str) -> list[str]:
    return text.split()


class OpenAIServer(LoopbackServer):
    def __init__(self, reply: str = "Hello from the loopback server"):
        super().__init__(reply)
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/openai/deployments/{deployment}/chat/completions")(self._chat)
        self.files: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        for prefix in ("/v1", "/openai"):
            self.app.post(prefix + "/files")(self._file_create)
            self.app.post(prefix + "/fine_tuning/jobs")(self._job_create)
            self.app.get(prefix + "/fine_tuning/jobs/{job_id}")(self._job_retrieve)
            self.app.post(prefix + "/fine_tuning/jobs/{job_id}/cancel")(self._job_cancel)

    def _note(self, request: Request, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(RecordedRequest(request.url.path, dict(request.query_params),
                                                 {k.lower(): v for k, v in request.headers.items()}, body))

    async def _file_create(self, request: Request) -> Response:
        form = await request.form()
        upload = form["file"]
        data = await upload.read()
        self._note(request, {"purpose": form.get("purpose"), "filename": upload.filename, "bytes": len(data)})
        file_id = f"file-loop{len(self.files)}"
        self.files[file_id] = data
        return JSONResponse({"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                             "filename": upload.filename, "purpose": form.get("purpose"), "status": "processed"})

    async def _job_create(self, request: Request) -> Response:
        body = await request.json()
        self._note(request, body)
        if body.get("training_file") not in self.files:
            return JSONResponse({"error": {"message": f"no file {body.get('training_file')}", "type":
                                           "invalid_request_error", "param": "training_file", "code": None}}, 400)
        job_id = f"ftjob-loop{len(self.jobs)}"
        self.jobs[job_id] = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "model": body["model"],
            "training_file": body["training_file"], "validation_file": None, "status": "validating_files",
            "fine_tuned_model": None, "finished_at": None, "error": None, "organization_id": "org-loop",
            "result_files": [], "trained_tokens": None, "seed": body.get("seed") or 0,
            "hyperparameters": body.get("hyperparameters") or {"n_epochs": "auto"}, "suffix": body.get("suffix")}
        return JSONResponse(self._public(job_id))

    def _public(self, job_id: str) -> dict[str, Any]:
        return dict(self.jobs[job_id])

    async def _job_retrieve(self, job_id: str, request: Request) -> Response:
        self._note(request, {})
        job = self.jobs[job_id]
        if job["status"] == "validating_files":
            job["status"] = "running"
        elif job["status"] == "running":
            job |= {"status": "succeeded", "finished_at": int(time.time()), "trained_tokens": 4321,
                    "fine_tuned_model": f"ft:{job['model']}:org-loop:{job['suffix'] or 'custom'}:{job_id[-5:]}"}
        return JSONResponse(self._public(job_id))

    async def _job_cancel(self, job_id: str, request: Request) -> Response:
        self._note(request, {})
        self.jobs[job_id] |= {"status": "cancelled", "finished_at": int(time.time())}
        return JSONResponse(self._public(job_id))

    async def _chat(self, request: Request) -> Response:
        body, fail = await self._record(request)
        if fail is not None:
            kind = "rate_limit_exceeded" if fail == 429 else "server_error"
            return JSONResponse({"error": {"message": f"injected {fail}", "type": kind, "param": None, "code": kind}},
                                status_code=fail, headers={"retry-after": "0"} if fail == 429 else None)
        model = body.get("model", "unknown")
        prompt_tokens = sum(len(_words(str(m.get("content", "")))) for m in body.get("messages", []))
        words = _words(self.reply)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "length" if limit and limit < len(words) else "stop"
        words = words[:limit] if limit else words
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                 "total_tokens": prompt_tokens + len(words)}
        base = {"id": "chatcmpl-loopback", "created": int(time.time()), "model": model}
        messages = body.get("messages") or [{}]
        if body.get("tools") and body.get("tool_choice") != "none" and messages[-1].get("role") != "tool":
            # the model calls the named tool (else the first) with "loopback" for each required argument
            named = (body.get("tool_choice") or {}).get("function", {}).get("name") if isinstance(
                body.get("tool_choice"), dict) else None
            function = next(t["function"] for t in body["tools"] if named in (None, t["function"]["name"]))
            arguments = json.dumps({k: "loopback" for k in function.get("parameters", {}).get("required", [])})
            call = {"id": f"call_{len(messages)}", "type": "function",
                    "function": {"name": function["name"], "arguments": arguments}}
            if not body.get("stream"):
                return JSONResponse({**base, "object": "chat.completion", "usage": usage, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                     "finish_reason": "tool_calls"}]})
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish}]})

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            payload = {**base, "object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return f"data: {json.dumps(payload)}\n\n"

        def events():
            yield chunk({"role": "assistant", "content": ""})
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word})
            yield chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total and header lengths) + CRC, headers, payload, CRC.

    Header values are all strings (type 7), which is all Bedrock's stream events use.
    """
    encoded = b""
    for name, value in headers.items():
        n, v = name.encode(), value.encode()
        encoded += struct.pack(">B", len(n)) + n + b"\x07" + struct.pack(">H", len(v)) + v
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(event_type: str, body: dict[str, Any]) -> bytes:
    return encode_event({":event-type": event_type, ":content-type": "application/json", ":message-type": "event"},
                        json.dumps(body).encode())


_ERROR_TYPES = {429: "ThrottlingException", 500: "InternalServerException", 503: "ServiceUnavailableException",
                400: "ValidationException"}


class BedrockServer(LoopbackServer):
    def __init__(self, reply: str = "Hello from the loopback server"):
        super().__init__(reply)
        self._stream_throttles = 0
        # :path because model ids may be ARNs, whose "/" arrive URL-encoded.
        self.app.post("/model/{model_id:path}/converse")(self._converse)
        self.app.post("/model/{model_id:path}/converse-stream")(self._converse_stream)

    def throttle_next_stream(self, n: int) -> None:
        """The next ``n`` ConverseStream calls answer 200 with a throttlingException event, as Bedrock can."""
        with self._lock:
            self._stream_throttles += n

    def _refuse(self, request: Request, fail: int | None) -> Response | None:
        if not request.headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 Credential="):
            return JSONResponse({"message": "Missing Authentication Token"}, status_code=403,
                                headers={"x-amzn-errortype": "MissingAuthenticationTokenException"})
        if fail is not None:
            error_type = _ERROR_TYPES.get(fail, "InternalServerException")
            return JSONResponse({"message": f"injected {fail}"}, status_code=fail,
                                headers={"x-amzn-errortype": f"{error_type}:http://internal.amazon.com/coral/"})
        return None

    def _answer(self, body: dict[str, Any]) -> tuple[list[str], str, dict[str, int]]:
        prompt = sum(len(_words(block.get("text", ""))) for m in body.get("messages", []) for block in m["content"])
        prompt += sum(len(_words(block.get("text", ""))) for block in body.get("system", []))
        words = _words(self.reply)
        limit = body.get("inferenceConfig", {}).get("maxTokens")
        stop = "max_tokens" if limit and limit < len(words) else "end_turn"
        words = words[:limit] if limit else words
        return words, stop, {"inputTokens": prompt, "outputTokens": len(words), "totalTokens": prompt + len(words)}

    @staticmethod
    def _tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
        """With tools offered and no tool result to read yet, the model calls one: the named one, else
        the first, with "loopback" for each required argument."""
        config = body.get("toolConfig")
        last = body.get("messages", [{}])[-1].get("content", [])
        if not config or any("toolResult" in block for block in last):
            return None
        named = config.get("toolChoice", {}).get("tool", {}).get("name")
        spec = next(t["toolSpec"] for t in config["tools"] if named in (None, t["toolSpec"]["name"]))
        required = spec["inputSchema"]["json"].get("required", [])
        return {"toolUseId": f"tooluse_{len(body['messages'])}", "name": spec["name"],
                "input": {name: "loopback" for name in required}}

    async def _converse(self, model_id: str, request: Request) -> Response:
        body, fail = await self._record(request)
        if (refusal := self._refuse(request, fail)) is not None:
            return refusal
        words, stop, usage = self._answer(body)
        if (call := self._tool_call(body)) is not None:
            return JSONResponse({"output": {"message": {"role": "assistant", "content": [{"toolUse": call}]}},
                                 "stopReason": "tool_use", "usage": usage}, headers={"x-amzn-requestid": "loopback-request"})
        return JSONResponse({"output": {"message": {"role": "assistant", "content": [{"text": " ".join(words)}]}},
                             "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 1}},
                            headers={"x-amzn-requestid": "loopback-request"})

    async def _converse_stream(self, model_id: str, request: Request) -> Response:
        body, fail = await self._record(request)
        if (refusal := self._refuse(request, fail)) is not None:
            return refusal
        with self._lock:
            throttled, self._stream_throttles = self._stream_throttles > 0, max(0, self._stream_throttles - 1)
        words, stop, usage = self._answer(body)

        def events():
            if throttled:
                yield encode_event({":exception-type": "throttlingException", ":content-type": "application/json",
                                    ":message-type": "exception"}, json.dumps({"message": "slow down"}).encode())
                return
            yield _event("messageStart", {"role": "assistant"})
            if (call := self._tool_call(body)) is not None:
                arguments = json.dumps(call["input"])
                yield _event("contentBlockStart", {"contentBlockIndex": 0, "start": {"toolUse": {
                    "toolUseId": call["toolUseId"], "name": call["name"]}}})
                for part in (arguments[:len(arguments) // 2], arguments[len(arguments) // 2:]):
                    yield _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": part}}})
                yield _event("contentBlockStop", {"contentBlockIndex": 0})
                yield _event("messageStop", {"stopReason": "tool_use"})
                yield _event("metadata", {"usage": usage, "metrics": {"latencyMs": 1}})
                return
            for i, word in enumerate(words):
                yield _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word if i == 0 else " " + word}})
            yield _event("contentBlockStop", {"contentBlockIndex": 0})
            yield _event("messageStop", {"stopReason": stop})
            yield _event("metadata", {"usage": usage, "metrics": {"latencyMs": 1}})

        return StreamingResponse(events(), media_type="application/vnd.amazon.eventstream",
                                 headers={"x-amzn-requestid": "loopback-request"})
