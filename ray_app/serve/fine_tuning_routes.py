"""The HTTP routes of OpenAI's files and fine-tuning API: glue over ``FileStore`` and
``FineTuningService`` (``ray_app.fine_tuning``). Creating files and jobs needs the ``fine_tune`` scope
(or admin) in keys mode; errors are OpenAI's format."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from starlette.responses import JSONResponse, Response

from ray_app.fine_tuning.files import PURPOSES, TrainingFileError
from ray_app.fine_tuning.jobs import FineTuningError, FineTuningService, JobCreate
from ray_app.serve.auth import Caller, caller_of
from ray_app.serve.errors import APIError, InvalidRequestError, NotFoundError, RequestTooLargeError

__all__ = ["fine_tuning_router"]

CallerDep = Annotated[Caller, Depends(caller_of)]


def _api_error(e: FineTuningError) -> APIError:
    if e.status == 404:
        error = NotFoundError(e.message, param=e.param)
    elif e.status == 400:
        error = InvalidRequestError(e.message, param=e.param)
    else:
        error = APIError(e.message, param=e.param)
        error.status_code = e.status
    if e.code:
        error.code = e.code
    return error


async def _run(call):
    try:
        return await call
    except FineTuningError as e:
        raise _api_error(e) from None


def fine_tuning_router(service: FineTuningService) -> APIRouter:
    router = APIRouter()
    files = service.files

    @router.post("/v1/files")
    async def create_file(caller: CallerDep, file: UploadFile = File(description="A JSONL training file."),
                          purpose: str = Form(description=f"One of {', '.join(PURPOSES)}.")) -> JSONResponse:
        caller.require_fine_tune()
        data = await file.read()
        try:
            record = await asyncio.to_thread(files.create, file.filename or "upload.jsonl", purpose, data)
        except TrainingFileError as e:
            raise InvalidRequestError(str(e), param="file", code="invalid_training_file") from None
        except ValueError as e:
            too_large = "over the limit" in str(e)
            raise (RequestTooLargeError if too_large else InvalidRequestError)(
                str(e), param="file" if too_large else "purpose") from None
        return JSONResponse(record.to_openai())

    @router.get("/v1/files")
    async def list_files(purpose: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
                         after: str | None = None) -> JSONResponse:
        records = await asyncio.to_thread(files.list, purpose, limit + 1, after)
        return JSONResponse({"object": "list", "data": [r.to_openai() for r in records[:limit]],
                             "has_more": len(records) > limit})

    def _file(file_id: str):
        record = files.get(file_id)
        if record is None:
            raise NotFoundError(f"no file {file_id!r}", param="file_id", code="file_not_found")
        return record

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str) -> JSONResponse:
        return JSONResponse((await asyncio.to_thread(_file, file_id)).to_openai())

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str) -> Response:
        await asyncio.to_thread(_file, file_id)
        return Response(await asyncio.to_thread(files.content, file_id), media_type="application/octet-stream")

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, caller: CallerDep) -> JSONResponse:
        caller.require_fine_tune()
        await asyncio.to_thread(_file, file_id)
        await asyncio.to_thread(files.delete, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @router.post("/v1/fine_tuning/jobs")
    async def create_job(body: JobCreate, caller: CallerDep) -> JSONResponse:
        caller.require_fine_tune()
        return JSONResponse(await _run(service.create(body)))

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(after: str | None = None, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> JSONResponse:
        return JSONResponse(await _run(service.list(after, limit)))

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str) -> JSONResponse:
        return JSONResponse(await _run(service.retrieve(job_id)))

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, after: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=1000)] = 20) -> JSONResponse:
        return JSONResponse(await _run(service.events(job_id, after, limit)))

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def job_checkpoints(job_id: str, after: str | None = None,
                              limit: Annotated[int, Query(ge=1, le=100)] = 10) -> JSONResponse:
        return JSONResponse(await _run(service.checkpoints(job_id, after, limit)))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str, caller: CallerDep) -> JSONResponse:
        caller.require_fine_tune()
        return JSONResponse(await _run(service.cancel(job_id)))

    return router
