"""The Checkpoint Merger over HTTP (not in A1111's API): `POST /sdapi/v1/merge` with the merger's arguments by
A1111's names. The merge runs as a job of the queue (it never races a generation); the answer names the new
checkpoint, which `/sd-models` lists at once. Bad input is a 400 before anything is queued (an unknown model or
VAE, Add difference without C, a multiplier outside 0..1, a bad regex), a taken file name a 409."""
from __future__ import annotations

from typing import Optional, Union

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modules.api.auth import current_user
from modules.api.errors import RETRY_AFTER, http_error, job_result


class MergeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    primary_model_name: str = Field(..., description="model A: a checkpoint title, name, file name or hash")
    secondary_model_name: Optional[str] = Field(None, description="model B (Weighted sum, Add difference)")
    tertiary_model_name: Optional[str] = Field(None, description="model C (Add difference)")
    interp_method: str = Field("Weighted sum", description='"Weighted sum" (A*(1-m)+B*m), "Add difference" '
                               '(A+(B-C)*m) or "No interpolation" (A alone: convert, bake in a VAE, discard)')
    multiplier: float = Field(0.3, description="m, from 0 to 1")
    save_as_half: bool = Field(False, description="write floating-point tensors as float16")
    custom_name: str = Field("", description='the new file name without extension; empty: "A_B_0.3", '
                             '"A_B_minus_C_0.3" or "A" (".inpainting" added for an inpainting result)')
    checkpoint_format: str = Field("safetensors", description='"safetensors" or "ckpt"')
    config_source: Union[int, str] = Field(0, description='copy NAME.yaml from: 0 "A, B or C" (the first found), '
                                           '1 "B", 2 "C", 3 "Don\'t"')
    bake_in_vae: Optional[str] = Field("None", description='a VAE from /sdapi/v1/sd-vae, or "None"')
    discard_weights: str = Field("", description="a regex: weights whose name it finds are left out")
    save_metadata: bool = Field(True, description="write A1111's sd_merge_recipe / sd_merge_models metadata")
    overwrite: bool = Field(False, description="replace a checkpoint of the same name (never one being merged)")


class MergeResponse(BaseModel):
    name: str
    title: str
    filename: str
    sha256: str
    config: Optional[str] = None


def _http(e: BaseException) -> BaseException:
    from modules.model_store import merging

    if isinstance(e, merging.OutputExistsError):
        return HTTPException(409, str(e))
    if isinstance(e, merging.MergeError):
        return HTTPException(400, str(e))
    return http_error(e) or e


def router(webui) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["merge"])

    @router.post("/merge", response_model=MergeResponse)
    async def merge(body: MergeBody, response: Response, user: str | None = Depends(current_user)):
        """Merge two or three checkpoints (A1111's Checkpoint Merger) into a new one in the model folder."""
        from modules.core.jobs import JobStopped
        from modules.model_store import merging

        req = merging.MergeRequest(**body.model_dump())

        def queue():
            try:
                return merging.submit(webui, req, owner=user)
            except Exception as e:
                raise _http(e) from None

        job = await run_in_threadpool(queue)
        response.headers["X-Task-Id"] = job.id
        try:
            result = await job_result(job)
        except JobStopped as e:
            raise HTTPException(503, f"the merge was stopped before it finished; nothing was written ({e})",
                                headers=RETRY_AFTER) from None
        except Exception as e:
            raise _http(e) from None
        info = webui.registry.find(str(result.path))
        return MergeResponse(name=info.name if info else result.path.name,
                             title=info.title if info else result.path.name, filename=str(result.path),
                             sha256=result.sha256, config=str(result.config) if result.config else None)

    return router
