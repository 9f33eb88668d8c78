"""The prompt styles in A1111's styles.csv: reading, applying to prompts, saving and deleting.

The file has the columns name, prompt, negative_prompt (A1111's very old files use "text" for the
prompt). Rows whose name starts with '#' are comments or dividers: they are not styles, but they
are kept where they are when the file is written back, as are columns this program does not know.
"""
from __future__ import annotations

import csv
import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from modules.core.fileio import atomic_write_text

STANDARD_COLUMNS = ("name", "prompt", "negative_prompt")
PROMPT_PLACEHOLDER = "{prompt}"


class UnknownStyleError(ValueError):
    """Style names that are not in the database; `names` lists them."""

    def __init__(self, names: Iterable[str]):
        self.names = list(names)
        super().__init__(f"Unknown style{'s' if len(self.names) != 1 else ''}: {', '.join(repr(n) for n in self.names)}")


@dataclass(frozen=True)
class PromptStyle:
    """One row of styles.csv. `extra` holds columns other than the standard three, so a save keeps them."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_comment(self) -> bool:
        return self.name.startswith("#")


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's rule: a style with {prompt} gets the prompt put there; otherwise it is appended after ", ".

    Appending strips both parts and skips an empty one, so an empty prompt gives just the style
    and an empty style leaves the prompt (stripped) alone.
    """
    if PROMPT_PLACEHOLDER in style_prompt:
        return style_prompt.replace(PROMPT_PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def unmerge_prompts(style_prompt: str, text: str) -> str | None:
    """The prompt `merge_prompts(style_prompt, prompt)` was made from, or None when `text` was not made so."""
    if not style_prompt.strip():
        return text.strip()
    if PROMPT_PLACEHOLDER in style_prompt:
        before, _, after = style_prompt.partition(PROMPT_PLACEHOLDER)
        if after.count(PROMPT_PLACEHOLDER):  # the prompt put in more than once: only a whole match is sure
            return None
        if text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after):
            return text[len(before):len(text) - len(after)]
        return None
    style, text = style_prompt.strip(), text.strip()
    if text == style:
        return ""
    if text.endswith(", " + style):
        return text[:-len(style) - 2].strip()
    return None


class StyleDatabase:
    """styles.csv in memory; thread-safe; every change is written back atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._rows: list[PromptStyle] = []
        self._columns: list[str] = list(STANDARD_COLUMNS)
        self.reload()

    # --- reading -----------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the file again; a missing file means no styles."""
        try:
            # utf-8-sig: A1111 writes a BOM, and Excel adds one too.
            with open(self.path, encoding="utf-8-sig", newline="") as handle:
                content = handle.read()
        except FileNotFoundError:
            content = ""
        rows, columns = _parse_csv(content)
        with self._lock:
            self._rows = rows
            self._columns = columns

    def names(self) -> list[str]:
        """Style names in file order."""
        with self._lock:
            return [row.name for row in self._rows if not row.is_comment]

    def get(self, name: str) -> PromptStyle | None:
        """The style called `name`, or None."""
        with self._lock:
            return next((row for row in self._rows if row.name == name and not row.is_comment), None)

    def styles(self) -> list[PromptStyle]:
        """All styles in file order (comment rows left out)."""
        with self._lock:
            return [row for row in self._rows if not row.is_comment]

    def api_list(self) -> list[dict[str, str]]:
        """/sdapi/v1/prompt-styles: [{name, prompt, negative_prompt}]."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in self.styles()]

    def extract(self, prompt: str, negative_prompt: str, style_names: Iterable[str]) -> tuple[str, str, list[str]]:
        """The reverse of `apply` for a pasted infotext (A1111's "Styles array"): each named style whose text
        the prompts hold is taken back out (the last applied first) and selected. Returns (prompt, negative
        prompt, the styles found); a style that is unknown here or whose text is not there stays out of both."""
        found: list[str] = []
        for name in reversed([n for n in style_names if n]):
            style = self.get(name)
            if style is None:
                continue
            p, n = unmerge_prompts(style.prompt, prompt), unmerge_prompts(style.negative_prompt, negative_prompt)
            if p is None or n is None:
                continue
            prompt, negative_prompt = p, n
            found.insert(0, name)
        return prompt, negative_prompt, found

    def apply(self, prompt: str, negative_prompt: str, style_names: Iterable[str] | None) -> tuple[str, str]:
        """(prompt, negative prompt) with the named styles applied in order (see merge_prompts).

        Unlike A1111, which silently skips names it does not know, unknown names raise
        UnknownStyleError listing every one of them, before anything is applied.
        """
        wanted = [name for name in (style_names or []) if name]
        with self._lock:
            found = [self.get(name) for name in wanted]
        missing = [name for name, style in zip(wanted, found) if style is None]
        if missing:
            raise UnknownStyleError(missing)
        prompt = prompt or ""
        negative_prompt = negative_prompt or ""
        for style in found:
            prompt = merge_prompts(style.prompt, prompt)
            negative_prompt = merge_prompts(style.negative_prompt, negative_prompt)
        return prompt, negative_prompt

    # --- writing -----------------------------------------------------------------------------------

    def save(self, style: PromptStyle) -> None:
        """Add `style`, or replace the style of that name where it stands; then write the file."""
        name = style.name.strip()
        if not name or name.startswith("#"):
            raise ValueError(f"a style name must not be empty or start with '#', got {style.name!r}")
        if name != style.name:
            style = PromptStyle(name, style.prompt, style.negative_prompt, style.extra)
        with self._lock:
            rows = list(self._rows)
            for index, row in enumerate(rows):
                if row.name == name and not row.is_comment:
                    rows[index] = style
                    break
            else:
                rows.append(style)
            self._write(rows)

    def delete(self, name: str) -> None:
        """Remove the style `name` and write the file; UnknownStyleError if there is none."""
        with self._lock:
            if self.get(name) is None:
                raise UnknownStyleError([name])
            self._write([row for row in self._rows if row.is_comment or row.name != name])

    def _write(self, rows: list[PromptStyle]) -> None:
        columns = list(self._columns)
        for row in rows:
            for key in row.extra:
                if key not in columns:
                    columns.append(key)
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {**row.extra, "name": row.name, "prompt": row.prompt, "negative_prompt": row.negative_prompt}
            )
        atomic_write_text(self.path, buffer.getvalue(), encoding="utf-8-sig")  # A1111 writes a BOM too
        # Memory changes only once the file holds the new content.
        self._rows = rows
        self._columns = columns


def _parse_csv(content: str) -> tuple[list[PromptStyle], list[str]]:
    reader = csv.DictReader(io.StringIO(content, newline=""), skipinitialspace=True)
    header = [c for c in (reader.fieldnames or []) if c]
    columns = list(STANDARD_COLUMNS) + [c for c in header if c not in STANDARD_COLUMNS and c != "text"]
    rows: list[PromptStyle] = []
    position: dict[str, int] = {}
    for record in reader:
        name = (record.get("name") or "").strip()
        if not name:
            continue
        prompt = record.get("prompt")
        if prompt is None:
            prompt = record.get("text")
        extra = {
            key: value or ""
            for key, value in record.items()
            if key and key not in STANDARD_COLUMNS and key != "text"
        }
        style = PromptStyle(name, prompt or "", record.get("negative_prompt") or "", extra)
        if name in position and not style.is_comment:
            # A1111 reads rows into a dict: a repeated name keeps its first place and the last values.
            rows[position[name]] = style
            continue
        position[name] = len(rows)
        rows.append(style)
    return rows, columns
