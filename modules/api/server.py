"""Stopping and restarting the server over the API (/server-stop, /server-kill, /server-restart; 403 unless the
server was started with --api-server-stop)."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask


class ServerControl:
    """Stop/restart of the running uvicorn server, handed to the API by webui.main (None in tests' apps)."""

    def __init__(self):
        self.server = None  # uvicorn.Server, set by webui.main once it exists
        self.restart_requested = False

    def stop(self, restart: bool = False) -> None:
        if self.server is None:
            raise RuntimeError("the server was not started by webui.py")
        self.restart_requested = restart
        self.server.should_exit = True


def router(webui, server_control: ServerControl | None) -> APIRouter:
    router = APIRouter(prefix="/sdapi/v1")

    def _server_action(restart: bool) -> JSONResponse:
        if not webui.args.api_server_stop:
            raise HTTPException(403, "stopping the server over the API is off: start it with --api-server-stop")
        if server_control is None or server_control.server is None:
            raise HTTPException(503, "this server was not started by webui.py and cannot stop itself")
        # answer first, then stop: the client gets its reply before the socket closes
        return JSONResponse({"message": "restarting" if restart else "stopping"},
                            background=BackgroundTask(server_control.stop, restart))

    @router.post("/server-stop")
    def server_stop():
        return _server_action(restart=False)

    @router.post("/server-kill")
    def server_kill():
        return _server_action(restart=False)

    @router.post("/server-restart")
    def server_restart():
        return _server_action(restart=True)

    return router
