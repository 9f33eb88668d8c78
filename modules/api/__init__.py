"""The HTTP API: A1111's /sdapi/v1 contract (and /internal for the UI), one router per resource over the
services, thin: a body becomes a service request, the answer A1111's shape. `include_routers` puts them on an
app. Auth is one middleware for every route (`auth`); request models are in `schemas`; failures map to
statuses in `errors`. The API never imports the wiring (`modules.app`): it is handed the server state."""
from __future__ import annotations


def include_routers(app, webui, server_control, *, api: bool) -> None:
    """/internal always (the UI polls it); /sdapi/v1 with `api` (the --api flag)."""
    from modules.api import (
        captioning,
        checkpoints,
        comparison,
        extra_networks,
        generation,
        images,
        lists,
        merge,
        progress,
        server,
        settings,
        training,
    )
    app.include_router(progress.internal_router(webui))
    if not api:
        return
    for module in (generation, progress, settings, checkpoints, lists, images, captioning, extra_networks, training,
                   merge, comparison):
        app.include_router(module.router(webui))
    app.include_router(server.router(webui, server_control))
