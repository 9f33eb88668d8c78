"""Entry point: flags -> one FastAPI app (Gradio UI at /, A1111 API at /sdapi/v1) -> uvicorn."""
from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from modules import cmd_args  # noqa: E402

log = logging.getLogger("webui")


def read_gradio_credentials(args) -> dict[str, str]:
    text = args.gradio_auth or ""
    if args.gradio_auth_path:
        with open(args.gradio_auth_path, encoding="utf-8") as f:
            text = ",".join(filter(None, [text, f.read()]))
    return cmd_args.parse_credentials(text)


def create_app(args):
    """Build the app and the server state. Loads no model: the first request that needs one does."""
    from fastapi import FastAPI

    from modules.api.api import build_router, install_error_handlers
    from modules.webui_app import Webui
    from modules.version import VERSION

    webui = Webui(args)
    app = FastAPI(title="Stable Diffusion studio", version=VERSION,
                  docs_url="/docs" if args.api else None, redoc_url=None,
                  openapi_url="/openapi.json" if args.api else None)
    install_error_handlers(app)
    api_credentials = cmd_args.parse_credentials(args.api_auth)
    gradio_credentials = read_gradio_credentials(args)
    if args.api:
        app.include_router(build_router(webui, api_credentials))
    if args.cors_allow_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=args.cors_allow_origins.split(","),
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
    if cmd_args.is_exposed(args) and not (api_credentials or gradio_credentials):
        log.warning("WARNING: the server listens on %s without --gradio-auth or --api-auth: anyone on your "
                    "network can use it, read its outputs and change its settings.", cmd_args.server_host(args))
    if not args.nowebui:
        import gradio as gr

        from modules.ui import ui
        blocks = ui.create_ui(webui)
        auth = list(gradio_credentials.items()) or None
        app = gr.mount_gradio_app(app, blocks, path="/", auth=auth, ssr_mode=False, show_error=True,
                                  theme=ui.theme(), css=ui.CSS, js=ui.JS, footer_links=["api"] if args.api else [],
                                  allowed_paths=[str(webui.outputs_root())])
    app.state.webui = webui
    return app, webui


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    started = time.perf_counter()
    args = cmd_args.parse_args(sys.argv[1:] if argv is None else argv)
    app, webui = create_app(args)
    import uvicorn

    host, port = cmd_args.server_host(args), args.port
    # an open browser tab holds a streaming connection; without a graceful-shutdown limit, SIGTERM/Ctrl+C
    # would wait for it forever
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_keep_alive=30,
                            timeout_graceful_shutdown=3,
                            ssl_keyfile=args.tls_keyfile, ssl_certfile=args.tls_certfile,
                            root_path=args.subpath or "")
    server = uvicorn.Server(config)

    orig_startup = server.startup

    async def startup(sockets=None):
        await orig_startup(sockets=sockets)
        shown = "127.0.0.1" if host == "0.0.0.0" else host
        scheme = "https" if args.tls_certfile else "http"
        print(f"Running on local URL:  {scheme}://{shown}:{port}  (ready in {time.perf_counter() - started:.1f} s)",
              flush=True)
        # No model is loaded before it is needed, but torch/diffusers are imported now so the first request is quick.
        webui.warm_up()

    server.startup = startup
    try:
        server.run()
    finally:
        webui.queue.shutdown(wait=False)


if __name__ == "__main__":
    main()
