"""The command line: A1111's flags (plus `COMMANDLINE_ARGS` appended), parsed into a namespace."""
from __future__ import annotations

import argparse
import os
import shlex
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="webui.py",
        description="Stable Diffusion studio: a Gradio UI and an A1111-compatible REST API on one server.",
    )
    net = p.add_argument_group("network")
    net.add_argument("--listen", action="store_true",
                     help="bind 0.0.0.0 so other machines on the LAN can connect (use with --gradio-auth/--api-auth)")
    net.add_argument("--server-name", default=None, help="host name or address to bind (overrides --listen)")
    net.add_argument("--port", type=int, default=None, help="port (default 7860; 7861 with --nowebui)")
    net.add_argument("--api", action="store_true", help="serve the A1111 REST API at /sdapi/v1 (Swagger at /docs)")
    net.add_argument("--nowebui", action="store_true", help="serve only the API, no Gradio UI")
    net.add_argument("--api-auth", default=None, help='API credentials "user:pass[,user2:pass2]"')
    net.add_argument("--gradio-auth", default=None, help='UI credentials "user:pass[,user2:pass2]"')
    net.add_argument("--gradio-auth-path", default=None, help="file with UI credentials, one user:pass per line or comma separated")
    net.add_argument("--api-log", action="store_true", help="log every API request")
    net.add_argument("--cors-allow-origins", default=None, help="comma-separated origins allowed by CORS")
    net.add_argument("--api-server-stop", action="store_true", help="enable /sdapi/v1/server-stop and server-restart")
    net.add_argument("--enable-insecure-extension-access", action="store_true")

    paths = p.add_argument_group("folders")
    paths.add_argument("--data-dir", default=None, help="outputs, config.json, styles.csv (default: the install folder)")
    paths.add_argument("--models-dir", default=None, help="root of the model folders (default: DATA_DIR/models)")
    paths.add_argument("--ckpt-dir", default=None, help="an extra folder of Stable Diffusion checkpoints")
    paths.add_argument("--ckpt", default=None, help="a checkpoint file to list and load first")
    paths.add_argument("--lora-dir", default=None, help="folder of LoRA files (default: MODELS_DIR/Lora)")
    paths.add_argument("--vae-dir", default=None, help="folder of VAE files (default: MODELS_DIR/VAE)")
    paths.add_argument("--text-encoder-dir", default=None,
                       help="folder of separate CLIP/T5 text-encoder files for FLUX transformer-only checkpoints "
                            "(default: MODELS_DIR/text_encoder and MODELS_DIR/text_encoders)")
    paths.add_argument("--embeddings-dir", default=None, help="folder of textual inversion embeddings")
    for arch in ("ESRGAN", "RealESRGAN", "SwinIR", "DAT"):
        paths.add_argument(f"--{arch.lower()}-models-path", default=None,
                           help=f"folder of {arch} upscaler models (default: MODELS_DIR/{arch})")
    paths.add_argument("--styles-file", default=None, help="styles CSV (default: DATA_DIR/styles.csv)")
    paths.add_argument("--hide-ui-dir-config", action="store_true")
    paths.add_argument("--freeze-settings", action="store_true", help="refuse settings changes from UI and API")

    dev = p.add_argument_group("device and memory")
    dev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    dev.add_argument("--device-id", default=None, help="CUDA device index")
    dev.add_argument("--use-cpu", nargs="*", default=None, help="A1111 compatibility: `--use-cpu all` means --device cpu")
    dev.add_argument("--precision", default="auto", choices=["auto", "full", "half", "bf16", "autocast"])
    dev.add_argument("--no-half", action="store_true", help="same as --precision full")
    dev.add_argument("--no-half-vae", action="store_true", help="keep the VAE in float32")
    dev.add_argument("--xformers", action="store_true", help="use xformers attention when importable on CUDA")
    dev.add_argument("--opt-sdp-attention", action="store_true", help="use PyTorch SDPA attention (the default)")
    dev.add_argument("--medvram", action="store_true", help="move model parts to the GPU only while they run")
    dev.add_argument("--lowvram", action="store_true", help="sequential CPU offload: least VRAM, slowest")

    misc = p.add_argument_group("start-up")
    misc.add_argument("--demo", action="store_true",
                      help="use a tiny random-weight model set (made once under the data dir); images are noise")
    misc.add_argument("--download-captioner", default=None, metavar="NAME",
                      help="download a captioner (e.g. blip2-opt-2.7b, blip-image-captioning-base) into "
                           "MODELS_DIR/BLIP2 or BLIP with huggingface_hub, then exit")
    misc.add_argument("--skip-load-model-at-start", action="store_true",
                      help="load no checkpoint until a request needs one (the default here; kept for A1111 scripts)")
    misc.add_argument("--no-hashing", action="store_true", help="do not compute checkpoint sha256 hashes")
    misc.add_argument("--disable-all-extensions", action="store_true",
                      help="load no extension at all, built-in ones included")
    misc.add_argument("--disable-extra-extensions", action="store_true",
                      help="load only the built-in extensions (extensions-builtin/)")
    misc.add_argument("--disable-safe-unpickle", action="store_true",
                      help="accepted for A1111 compatibility; .ckpt files are still loaded with weights_only=True")
    misc.add_argument("--subpath", default=None, help="serve under this URL path prefix")
    misc.add_argument("--tls-keyfile", default=None)
    misc.add_argument("--tls-certfile", default=None)
    return p


def parse_args(argv: Sequence[str] | None = None, environ: dict | None = None) -> argparse.Namespace:
    """Parse argv with `COMMANDLINE_ARGS` appended, as A1111's launcher does."""
    environ = os.environ if environ is None else environ
    argv = list(argv) if argv is not None else []
    argv += shlex.split(environ.get("COMMANDLINE_ARGS", ""))
    parser = build_parser()
    preload_errors = add_extension_flags(parser, argv)
    args = parser.parse_args(argv)
    args.preload_errors = preload_errors
    if args.use_cpu is not None and ("all" in args.use_cpu or "sd" in args.use_cpu):
        args.device = "cpu"
    if args.no_half:
        args.precision = "full"
    if args.port is None:
        args.port = 7861 if args.nowebui else 7860
    if args.nowebui:
        args.api = True
    return args


def add_extension_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Run the enabled extensions' preload.py (A1111's `preload(parser)`) so their own flags parse; the errors
    of broken ones (which are skipped)."""
    from pathlib import Path

    from modules.core import extensions, paths
    known, _ = parser.parse_known_args(argv)
    data_dir = Path(known.data_dir).resolve() if known.data_dir else paths.REPO_ROOT
    disabled, config_all = extensions.disabled_in_config(data_dir / "config.json")
    found = extensions.discover(data_dir, disabled, disable_all=known.disable_all_extensions,
                                disable_extra=known.disable_extra_extensions, config_all=config_all)
    return extensions.run_preloads(found, parser)


def server_host(args: argparse.Namespace) -> str:
    if args.server_name:
        return args.server_name
    return "0.0.0.0" if args.listen else "127.0.0.1"


def is_exposed(args: argparse.Namespace) -> bool:
    """True when the server may be reached from other machines (A1111 calls this non-local)."""
    return server_host(args) not in ("127.0.0.1", "localhost", "::1")


def parse_credentials(text: str | None) -> dict[str, str]:
    """`user:pass[,user2:pass2]` (or one per line) -> {user: pass}. Raises ValueError on a malformed entry."""
    creds: dict[str, str] = {}
    if not text:
        return creds
    for item in text.replace("\n", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"credential {item!r} is not of the form user:password")
        user, password = item.split(":", 1)
        creds[user] = password
    return creds
