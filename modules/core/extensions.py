"""Extensions on disk, in A1111's layout: `extensions/NAME/` (the data dir's, or the install folder's when no
`--data-dir` is given) and `extensions-builtin/NAME/`, each with any of `scripts/*.py`, `preload.py`,
`install.py`, `javascript/*.js`, `style.css`, `metadata.ini`. Which are enabled (config.json's
`disabled_extensions`, `--disable-all-extensions`, `--disable-extra-extensions`), their git state, and the git
operations the Extensions tab runs (clone, fetch). Nothing here imports an extension's code except `preload`.
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from modules.core import paths

log = logging.getLogger("webui.extensions")

BUILTIN_DIR = paths.REPO_ROOT / "extensions-builtin"
GIT_TIMEOUT = 60


class ExtensionError(ValueError):
    """An extension operation that cannot be done as asked (a bad URL, a name in use, git failing)."""


@dataclass
class Extension:
    name: str
    path: Path
    builtin: bool
    enabled: bool = True
    why_disabled: str = ""  # "" when enabled
    metadata: dict = field(default_factory=dict)  # metadata.ini's [Extension] section
    errors: list[str] = field(default_factory=list)  # what failed while it loaded (shown in the Extensions tab)

    @property
    def scripts(self) -> list[Path]:
        folder = self.path / "scripts"
        return sorted(p for p in folder.glob("*.py") if p.is_file()) if folder.is_dir() else []

    @property
    def javascript(self) -> list[Path]:
        folder = self.path / "javascript"
        return sorted(folder.glob("*.js")) if folder.is_dir() else []

    @property
    def style(self) -> Path | None:
        css = self.path / "style.css"
        return css if css.is_file() else None

    @property
    def install_script(self) -> Path | None:
        script = self.path / "install.py"
        return script if script.is_file() else None

    def git(self, *args: str, timeout: float = GIT_TIMEOUT) -> str | None:
        """`git ARGS` in the extension's folder; None when it is not a git checkout or git fails."""
        if not (self.path / ".git").exists():
            return None
        try:
            done = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                                  timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    def version(self) -> dict:
        """remote URL, branch, commit and its date (empty strings for a folder that is not a git checkout)."""
        return {"remote": self.git("config", "--get", "remote.origin.url") or "",
                "branch": self.git("rev-parse", "--abbrev-ref", "HEAD") or "",
                "commit": (self.git("rev-parse", "HEAD") or "")[:8],
                "date": self.git("log", "-1", "--format=%cd", "--date=short") or ""}


def extension_dirs(data_dir: Path) -> list[tuple[Path, bool]]:
    """(folder, built-in) pairs searched for extensions."""
    return [(Path(data_dir) / "extensions", False), (BUILTIN_DIR, True)]


def read_metadata(folder: Path) -> dict:
    ini = folder / "metadata.ini"
    if not ini.is_file():
        return {}
    parser = configparser.ConfigParser()
    try:
        parser.read(ini, encoding="utf-8")
    except configparser.Error as e:
        log.warning("%s: %s", ini, e)
        return {}
    return dict(parser["Extension"]) if parser.has_section("Extension") else {}


DEFAULT_DISABLED = ["example-extension"]  # the shipped example stays off until the user enables it


def disabled_in_config(config_file: Path) -> tuple[set[str], str]:
    """(names disabled in config.json, its `disable_all_extensions`: none / extra / all)."""
    try:
        data = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    names = data.get("disabled_extensions", DEFAULT_DISABLED)
    return {str(n) for n in names} if isinstance(names, list) else set(), str(data.get("disable_all_extensions", "none"))


def discover(data_dir: Path, disabled: set[str], *, disable_all: bool = False, disable_extra: bool = False,
             config_all: str = "none") -> list[Extension]:
    """Every extension folder, with whether it is enabled and why not."""
    found = []
    for folder, builtin in extension_dirs(data_dir):
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            ext = Extension(path.name, path, builtin, metadata=read_metadata(path))
            if disable_all or config_all == "all":
                ext.why_disabled = "--disable-all-extensions" if disable_all else "all extensions are disabled"
            elif not builtin and (disable_extra or config_all == "extra"):
                ext.why_disabled = "--disable-extra-extensions" if disable_extra else "extra extensions are disabled"
            elif ext.name in disabled:
                ext.why_disabled = "disabled in the Extensions tab"
            ext.enabled = not ext.why_disabled
            found.append(ext)
    return found


def run_preloads(extensions: list[Extension], parser) -> list[str]:
    """Call `preload(parser)` of every enabled extension's preload.py, before the command line is parsed (so
    an extension's own flags are accepted). Returns the errors (a broken preload is skipped)."""
    errors = []
    for ext in extensions:
        script = ext.path / "preload.py"
        if not ext.enabled or not script.is_file():
            continue
        try:
            module_name = "extension_preload_" + re.sub(r"\W", "_", ext.name)
            spec = importlib.util.spec_from_file_location(module_name, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception as e:  # one broken extension must not stop the server from starting
            message = f"{script}: {type(e).__name__}: {e}"
            log.error("extension %s: preload failed: %s", ext.name, message)
            errors.append(message)
            ext.errors.append(f"preload.py failed: {type(e).__name__}: {e}")
    return errors


URL_RE = re.compile(r"^(https?://|git@|ssh://|file://|/)[^\s]+$")


def name_from_url(url: str) -> str:
    name = url.rstrip("/").split("/")[-1]
    name = name[:-4] if name.endswith(".git") else name
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
        raise ExtensionError(f"cannot name an extension folder after {url!r}; give a name")
    return name


def clone(url: str, dest_root: Path, name: str | None = None, branch: str | None = None) -> Path:
    """Clone `url` into dest_root/NAME (into a temporary folder first, so a failed clone leaves nothing)."""
    url = url.strip()
    if not URL_RE.match(url):
        raise ExtensionError(f"not a git URL: {url!r}")
    name = (name or "").strip() or name_from_url(url)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
        raise ExtensionError(f"extension folder name {name!r}: use letters, digits, '.', '_' and '-'")
    dest_root = Path(dest_root)
    dest = dest_root / name
    if dest.exists():
        raise ExtensionError(f"an extension named {name!r} is already installed ({dest})")
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest_root))
    cmd = ["git", "clone", "--depth", "1", *(["--branch", branch] if branch else []), url, str(tmp / name)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise ExtensionError(f"git clone failed: {done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode}")
        (tmp / name).rename(dest)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExtensionError(f"git clone failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def check_for_update(ext: Extension) -> str:
    """'behind N', 'latest', or why it cannot tell (not a git checkout, offline)."""
    if not (ext.path / ".git").exists():
        return "not a git checkout"
    try:
        done = subprocess.run(["git", "-C", str(ext.path), "fetch", "--quiet"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not check: {e}"
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"git exited {done.returncode}"
        return f"could not check (offline?): {last}"
    behind = ext.git("rev-list", "--count", "HEAD..@{u}")
    if behind is None:
        return "no upstream branch"
    return "latest" if behind == "0" else f"behind {behind}"


def pull(ext: Extension) -> str:
    try:
        done = subprocess.run(["git", "-C", str(ext.path), "pull", "--ff-only", "--quiet"], capture_output=True,
                              text=True, timeout=GIT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExtensionError(f"update of {ext.name} failed: {e}") from None
    if done.returncode != 0:
        raise ExtensionError(f"update of {ext.name} failed: {done.stderr.strip() or done.returncode}")
    return "updated; restart the server to load the new code"


def install_plan(ext: Extension) -> str:
    """What running the extension's install.py would do, shown before the user confirms: the script itself and
    any requirements file beside it."""
    parts = []
    script = ext.install_script
    if script is None:
        return "This extension has no install.py: nothing to run."
    parts.append(f"### {script.name}\n```python\n{script.read_text(encoding='utf-8', errors='replace')[:20000]}\n```")
    req = ext.path / "requirements.txt"
    if req.is_file():
        parts.append(f"### requirements.txt\n```\n{req.read_text(encoding='utf-8', errors='replace')[:5000]}\n```")
    return "\n\n".join(parts)


def run_install(ext: Extension, timeout: float = 1800) -> str:
    """Run install.py with this server's Python, in the extension's folder; its output (raises on failure)."""
    script = ext.install_script
    if script is None:
        return "no install.py"
    try:
        done = subprocess.run([sys.executable, str(script)], cwd=str(ext.path), capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ExtensionError(f"install.py of {ext.name} failed: {e}") from None
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise ExtensionError(f"install.py of {ext.name} exited with {done.returncode}: {output[-2000:]}")
    return output or "install.py finished"
