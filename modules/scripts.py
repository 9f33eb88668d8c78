"""A1111's `modules.scripts`, for scripts and extensions written for A1111 (`from modules import scripts`):
`Script`, `AlwaysVisible`, `basedir()`, `PostprocessImageArgs`. The studio's own names live in
`modules.scripting`; these are the same objects under A1111's names, not copies."""
from __future__ import annotations

from dataclasses import dataclass

from modules.core import paths
from modules.generation.results import PostprocessImageArgs  # noqa: F401
from modules.scripting.script_base import AlwaysVisible, Script, ScriptError  # noqa: F401

current_basedir = str(paths.REPO_ROOT)  # the folder of the extension whose scripts are loading


def basedir() -> str:
    """The folder of the extension a script file belongs to (the install folder for the studio's own scripts),
    as A1111 answers it while the file loads: call it at import time and keep the value."""
    return current_basedir


@dataclass
class PostprocessBatchListArgs:
    images: list
