"""The layers of `modules/`, kept by reading every module's imports (top-level and inside functions) with ast.

    core  <-  prompting  <-  model_store  <-  networks  <-  services (generation, captioning)  <-  training  <-  demo
          <-  scripting (+ A1111's module names for extensions: scripts, shared, processing, ...)
          <-  app (the wiring), ui, api

An import points down, or within its own package, never up. Services may call each other's public names, never
their private ones (`_x`); neither the UI nor the API imports the wiring (`modules.app`), nor each other.
(The prompt language sits under the model store because loading a checkpoint offline needs the shipped CLIP
tokenizer.)
"""
from __future__ import annotations

import ast
from pathlib import Path

MODULES = Path(__file__).resolve().parents[2] / "modules"

A1111_NAMES = {"scripts", "script_callbacks", "shared", "processing", "images"}
# package -> the packages it may import (its own always)
ALLOWED = {
    "core": set(),
    "prompting": {"core"},
    "model_store": {"core", "prompting"},
    "networks": {"core", "model_store", "prompting"},
    "generation": {"core", "model_store", "prompting", "networks", "captioning"},
    "captioning": {"core", "model_store", "prompting", "generation"},
    "caption": {"core", "model_store", "captioning"},  # the captioning CLI
    "training": {"core", "model_store", "prompting", "networks", "generation", "captioning"},
    "train": {"core", "training", "model_store", "captioning"},  # the training CLI
    "demo": {"core", "model_store", "prompting", "networks", "generation", "captioning"},
    # scripts and extensions (A1111's Script API), and A1111's module names they import, thin views over it
    "scripting": {"core", "model_store", "prompting", "networks", "generation", "captioning", *A1111_NAMES},
    **{name: {"core", "model_store", "prompting", "networks", "generation", "scripting", *A1111_NAMES}
       for name in A1111_NAMES},
    "app": {"core", "model_store", "prompting", "networks", "generation", "captioning", "training", "demo",
            "scripting", "shared"},
    "ui": {"core", "model_store", "prompting", "networks", "generation", "captioning", "training", "scripting"},
    "api": {"core", "model_store", "prompting", "networks", "generation", "captioning", "training"},
}
SERVICES = {"generation", "captioning", "training", "scripting"}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "modules" else None


def imports_of(path: Path, root: Path = MODULES) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names taken from it) for every import of a file."""
    module = "modules." + ".".join(path.relative_to(root).with_suffix("").parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = module.split(".")[:-node.level]
                base = ".".join(parent + ([base] if base else []))
            names = [alias.name for alias in node.names]
            if base == "modules":  # `from modules import generation` imports the package generation
                found += [(node.lineno, f"modules.{n}", []) for n in names]
            else:
                found.append((node.lineno, base, names))
    return found


def layer_problems(root: Path) -> list[str]:
    """Every import under `root` (a modules/ folder) that breaks the layers, named with its file and line."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel == Path("__init__.py"):
            continue
        own = rel.parts[0].removesuffix(".py")
        allowed = ALLOWED.get(own)
        if allowed is None:
            problems.append(f"modules/{rel}: a new top-level package; give it a layer in ALLOWED")
            continue
        for line, target, names in imports_of(path, root):
            pkg = package_of(target)
            if pkg is None or pkg == own:
                continue
            where = f"modules/{rel}:{line} imports {target}" + (f" ({', '.join(names)})" if names else "")
            if pkg not in allowed:
                problems.append(f"{where}: {own} may not import {pkg}")
            elif own in SERVICES and pkg in SERVICES and any(n.startswith("_") for n in names):
                problems.append(f"{where}: a private name of another service")
    return problems


def test_every_import_points_down_and_no_service_uses_another_services_private_names():
    problems = layer_problems(MODULES)
    assert not problems, "\n".join(problems)


def test_the_layer_check_names_the_offending_import(tmp_path):
    """The check itself: a core module importing a service, the API importing the wiring, a service taking
    another's private name, each is named with its line."""
    fake = tmp_path / "modules"
    for package in ("core", "api", "generation"):
        (fake / package).mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from modules.generation import txt2img\n")
    (fake / "api" / "worse.py").write_text("from modules.app import Webui\n")
    (fake / "generation" / "peek.py").write_text("from modules.captioning.service import _secret\n")
    problems = layer_problems(fake)
    assert "modules/core/bad.py:2 imports modules.generation (txt2img): core may not import generation" in problems
    assert "modules/api/worse.py:1 imports modules.app (Webui): api may not import app" in problems
    assert ("modules/generation/peek.py:1 imports modules.captioning.service (_secret): a private name of "
            "another service") in problems
