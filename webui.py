"""Entry point: flags -> one FastAPI app (Gradio UI at /, A1111 API at /sdapi/v1) -> uvicorn."""
from __future__ import annotations

import logging
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from modules.core import cmd_args  # noqa: E402

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

    from modules.api import auth as api_auth
    from modules.api import include_routers
    from modules.api.errors import install_error_handlers
    from modules.api.middleware import install_edge_middleware
    from modules.api.server import ServerControl
    from modules.app import Webui
    from modules.core.version import VERSION

    webui = Webui(args)
    app = FastAPI(title="Stable Diffusion studio", version=VERSION,
                  docs_url="/docs" if args.api else None, redoc_url=None,
                  openapi_url="/openapi.json" if args.api else None)
    install_error_handlers(app)
    api_credentials = cmd_args.parse_credentials(args.api_auth)
    gradio_credentials = read_gradio_credentials(args)
    # One auth layer for every route of the app, routers included later too (see modules/api/auth.py).
    authenticator = api_auth.Authenticator(api_credentials, gradio_credentials)
    server_control = ServerControl()
    app.state.server_control = server_control
    include_routers(app, webui, server_control, api=args.api)
    install_edge_middleware(app, authenticator=authenticator, api_log=args.api_log,
                            cors_origins=args.cors_allow_origins,
                            max_request_bytes=lambda: webui.options.get("api_max_request_mb") * 2**20)
    if cmd_args.is_exposed(args) and not (api_credentials or gradio_credentials):
        log.warning("WARNING: the server listens on %s without --gradio-auth or --api-auth: anyone on your "
                    "network can use it, read its outputs and change its settings.", cmd_args.server_host(args))
    if not args.nowebui:
        import gradio as gr

        from modules.ui import ui
        blocks = ui.create_ui(webui)
        # the UI's login form accepts --api-auth and --gradio-auth users alike
        app = gr.mount_gradio_app(app, blocks, path="/", auth=api_auth.gradio_auth_callback(authenticator),
                                  ssr_mode=False, show_error=True,
                                  theme=ui.theme(), css=ui.css(webui), js=ui.js(webui), footer_links=["api"] if args.api else [],
                                  allowed_paths=[str(webui.outputs_root())])
        authenticator.attach_gradio(api_auth.mounted_gradio_app(app))
    app.state.webui = webui
    webui.scripts.callbacks.call("app_started", blocks if not args.nowebui else None, app)
    return app, webui


def main(argv=None) -> None:
    from modules.core import console
    console.setup_logging()
    started = time.perf_counter()
    args = cmd_args.parse_args(sys.argv[1:] if argv is None else argv)
    if args.download_captioner:
        from modules.captioning.cli import download_and_exit
        download_and_exit(args)
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
    control = app.state.server_control
    control.server = server  # /sdapi/v1/server-stop and server-restart (with --api-server-stop)
    try:
        server.run()
    finally:
        if getattr(webui, "_training", None) is not None:
            webui._training.shutdown()  # running children save a resumable state and end
        webui.queue.shutdown(wait=False)
        webui.scripts.callbacks.call("script_unloaded")
    if control.restart_requested:
        # a restart is a fresh process with the same command line, so every module and setting is re-read
        log.info("restarting: %s", " ".join(sys.argv))
        os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    main()
