"""The model comparison report over HTTP (not in A1111's API): `POST /sdapi/v1/model-comparison` runs the same
prompts and seeds over chosen checkpoints of any family as one job of the queue and answers with the report's
files (HTML, CSV, one grid per prompt, under outputs/comparisons/) and its table: seconds per image, peak
memory, load time and prompt alignment per image and per checkpoint. Bad input (an unknown checkpoint, no
prompts, a bad size) is a 422 before anything runs."""
from __future__ import annotations

from typing import Any, Optional

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from modules.api.auth import current_user
from modules.api.errors import RETRY_AFTER, http_error, job_result


class ComparisonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoints: list[str] = Field(..., description="checkpoint titles, names, file names or hashes")
    prompts: list[str] = Field(..., description="the prompts every checkpoint makes")
    seeds: list[int] = Field(default_factory=lambda: [1], description="the seeds of every prompt (fixed numbers)")
    negative_prompt: str = ""
    steps: int = 20
    width: int = 512
    height: int = 512
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5
    sampler_name: str = "Euler"
    alignment: bool = Field(True, description="score prompt alignment with the retrieval model (blip2-itm)")
    alignment_model: Optional[str] = None
    cfg_scale_per_checkpoint: dict[str, float] = Field(default_factory=dict,
                                                       description="CFG scale by checkpoint name (FLUX wants 1)")


class ComparisonResponse(BaseModel):
    folder: str
    html: str
    csv: str
    grids: list[str]
    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    notes: list[str]
    alignment_model: Optional[str] = None


def router(webui) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1", tags=["comparison"])

    @router.post("/model-comparison", response_model=ComparisonResponse)
    async def model_comparison(body: ComparisonBody, response: Response, user: str | None = Depends(current_user)):
        """The same prompts and seeds over several checkpoints, as a report (see the module's docstring)."""
        from modules.core.jobs import JobStopped
        from modules.generation import comparison

        fields = body.model_dump()
        req = comparison.ComparisonRequest(**{**fields, "checkpoints": tuple(body.checkpoints),
                                              "prompts": tuple(body.prompts), "seeds": tuple(body.seeds)})

        def queue():
            try:
                return webui.submit_model_comparison(req, owner=user)
            except Exception as e:
                raise (http_error(e) or e) from None

        job = await run_in_threadpool(queue)
        response.headers["X-Task-Id"] = job.id
        try:
            result = await job_result(job)
        except JobStopped as e:
            raise HTTPException(503, f"the comparison was stopped before it finished ({e})",
                                headers=RETRY_AFTER) from None
        except Exception as e:
            raise (http_error(e) or e) from None
        return ComparisonResponse(**result)

    return router
