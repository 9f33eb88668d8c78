"""Captioning, VQA and image-text search with BLIP-2 and BLIP: models (discovery, loading, download),
the service (requests, jobs), metrics, and the tiny test models. `Captioning` is what UI and API use."""
from modules.captioning.models import (  # noqa: F401
    KNOWN_CAPTIONERS,
    CaptionerDownloadError,
    CaptionerError,
    CaptionerInfo,
    CaptionerNotFoundError,
    CaptionerRegistry,
    download_captioner,
)
from modules.captioning.service import (  # noqa: F401
    CAPTION_STYLES,
    VQA_SETTINGS,
    BatchCaptionRequest,
    BatchSummary,
    Captioning,
    CaptionRequest,
    CaptionSettings,
    EmbeddingsRequest,
    EvaluateRequest,
    SearchHit,
    SearchRequest,
    VqaRequest,
)


def captioner_roots(webui) -> list:
    """models/BLIP2 and models/BLIP (and the demo set's BLIP2 with --demo)."""
    roots = [webui.folders.models_dir / "BLIP2", webui.folders.models_dir / "BLIP"]
    if webui.args.demo:
        roots.append(webui.folders.data_dir / "demo-models" / "BLIP2")
    return roots


def for_webui(webui) -> Captioning:
    """The Captioning service over the server's folders, job queue and model manager."""
    return Captioning(registry=CaptionerRegistry(captioner_roots(webui)), queue=webui.queue,
                      runtime=webui.runtime, cache_dir=webui.folders.data_dir / "cache" / "image-search",
                      default_search_folder=webui.outputs_root, models_dir=webui.folders.models_dir)
