"""Pydantic models of A1111's /sdapi/v1 requests and responses (every request field optional)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # A1111 ignores fields it does not know; so do we (clients send newer/older fields).
    model_config = ConfigDict(extra="ignore")


class _GenerationRequest(_Request):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing API fields)."""
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = "Euler"
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5  # Forge's field: FLUX.1-dev's distilled guidance
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    force_task_id: Optional[str] = None
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: Optional[str] = None


class Txt2ImgRequest(_GenerationRequest):
    denoising_strength: Optional[float] = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_GenerationRequest):
    init_images: Optional[list[str]] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    denoising_strength: float = 0.75
    include_init_images: bool = False


class ImageResponse(BaseModel):
    images: Optional[list[str]] = None
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: Optional[str] = None
    textinfo: Optional[str] = None
    current_task: Optional[str] = None


class PNGInfoRequest(_Request):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: Optional[str]
    sha256: Optional[str]
    filename: str
    config: Optional[str] = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: Optional[list[str]] = None
    default_rho: Optional[float] = None
    need_inner_model: Optional[bool] = None


class MemoryModelItem(BaseModel):
    name: str
    kind: str
    device: str
    bytes: int
    host_bytes: int = 0  # kept in CPU RAM beside the weights (e.g. originals of LoRA-touched weights)
    loads: int
    last_used: Optional[float]
    # a checkpoint's parts by name (unet or transformer, vae, text_encoder, text_encoder_2 (FLUX's T5), ...): bytes
    components: dict[str, int] = Field(default_factory=dict)


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]
    models: list[MemoryModelItem]


class ExtrasBaseRequest(_Request):
    resize_mode: int = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: float = 0.0
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = 0.0
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(_Request):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(default_factory=list)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: Optional[str] = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscalerItem(BaseModel):
    name: str
    model_name: Optional[str] = None
    model_path: Optional[str] = None
    model_url: Optional[str] = None
    scale: Optional[float] = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class TaskIdRequest(_Request):
    id_task: Optional[str] = None


class InternalProgressRequest(_Request):
    id_task: Optional[str] = None
    id_live_preview: int = -1
    live_preview: bool = True


class InternalProgressResponse(BaseModel):
    active: bool
    queued: bool
    completed: bool
    progress: Optional[float] = None
    eta: Optional[float] = None
    live_preview: Optional[str] = None
    id_live_preview: Optional[int] = None
    textinfo: Optional[str] = None
    queue_position: Optional[int] = None


class PendingTask(BaseModel):
    id: Optional[str] = None  # only the caller's own tasks show their id
    kind: str
    position: int
    eta: Optional[float] = None
    mine: bool


class PendingTasksResponse(BaseModel):
    running: Optional[PendingTask] = None
    tasks: list[PendingTask]


# --- captioning (/interrogate, /vqa, /captioners, /search) ---------------------------------------------

class InterrogateRequest(_Request):
    image: str = Field("", description="base64 image (or data URI)")
    model: str = Field("clip", description='a captioner folder name; "clip" (A1111\'s default) = the default captioner')
    prompt: Optional[str] = Field(None, description='text the caption continues, e.g. "a photo of"')
    num_beams: Optional[int] = None
    nucleus: Optional[bool] = None
    top_p: Optional[float] = None
    min_length: Optional[int] = None
    max_length: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None


class InterrogateResponse(BaseModel):
    caption: str


class VqaRequest(_Request):
    image: str = ""
    question: str = ""
    model: Optional[str] = None
    history: list[Any] = Field(default_factory=list,
                               description='earlier turns, oldest first: [["question", "answer"], ...] or '
                                           '[{"question": ..., "answer": ...}, ...]')


class VqaResponse(BaseModel):
    answer: str


class CaptionerItem(BaseModel):
    name: str
    kind: str
    path: str
    loaded: bool
    trained_from: Optional[str] = Field(None, description="a fine-tuned captioner: the base it was trained from")


class SearchRequest(_Request):
    query: str = ""
    folder: Optional[str] = Field(None, description="folder to search (default: the outputs folder)")
    model: Optional[str] = None
    top_k: int = 10
    rerank: bool = True


class SearchHitItem(BaseModel):
    path: str
    score: float
    itc: float
    itm: Optional[float] = None


class SearchResponse(BaseModel):
    results: list[SearchHitItem]


# --- retrieval embeddings (/embeddings/image, /embeddings/text) -------------------------------------------

class ImageEmbeddingsRequest(_Request):
    images: list[str] = Field(default_factory=list, description="base64 images (or data URIs)")
    model: Optional[str] = Field(None, description="a BLIP-2 retrieval model (blip2-itm); default: the first one")


class TextEmbeddingsRequest(_Request):
    texts: list[str] = Field(default_factory=list)
    model: Optional[str] = Field(None, description="a BLIP-2 retrieval model (blip2-itm); default: the first one")


class EmbeddingsResponse(BaseModel):
    model: str
    kind: str = Field(description="image or text")
    shape: list[int] = Field(description="[N, num_query_tokens, D] for images, [N, D] for texts")
    embeddings: list[Any] = Field(description="L2-normalised; an image's similarity to a text is the largest "
                                              "dot product over its query-token vectors (BLIP-2's ITC)")
