"""The extra-networks panel of a generation tab (LoRA and embedding cards, with their pictures, for the
checkpoint in use; a click adds the tag to the prompt, a second click takes it out), the per-chunk token
counter, and the notice listing prompt tags that were ignored."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from modules.ui.common import icon_button

THUMBNAIL = (192, 192)
_thumbnails: dict[tuple[str, int], str] = {}


def token_counter_html(text: str, webui=None) -> str:
    """"N/75" as A1111 shows it: the limit grows by 75 per chunk (BREAK, long prompts); tags do not count,
    and an embedding of the current checkpoint counts as its number of vectors."""
    if not text:
        return '<div class="token-counter">0/75</div>'  # no tokenizer (and no transformers import) needed
    from modules.prompting import clip_tokenizer, prompts
    embeddings = None
    if webui is not None and getattr(webui, "extra_networks", None) is not None:
        embeddings = webui.extra_networks.embeddings_for(webui.current_checkpoint())[0]
    tokens, limit = prompts.token_counts(text, clip_tokenizer.clip_tokenizer(), embeddings)
    cls = "token-counter over" if tokens > 75 else "token-counter"
    return f'<div class="{cls}" title="{limit // 75} chunk(s) of 75 tokens">{tokens}/{limit}</div>'


def warnings_html(warnings, tab: str = "txt2img") -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="notice-error" id="{tab}_network_warnings">Made anyway, but:<ul>{items}</ul></div>'


def _thumbnail(path: Path) -> str | None:
    """A small JPEG data URI of a preview picture (cached per file version); the page never reads server paths."""
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    if key not in _thumbnails:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im.thumbnail(THUMBNAIL)
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="JPEG", quality=85)
        except (OSError, UnidentifiedImageError):
            return None
        _thumbnails[key] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return _thumbnails[key]


def cards_html(webui, tab: str, query: str = "") -> str:
    """The cards that apply to the current checkpoint (and those that cannot be told apart), filtered by
    `query`; how many were left out as made for another model is said under them."""
    from modules import networks
    query = (query or "").strip().lower()
    cards = networks.cards_for(webui.extra_networks, webui.current_checkpoint())
    hidden = [c for c in cards if c.applies is False]
    shown = [c for c in cards if c.applies is not False and (not query or query in c.name.lower())]
    parts = []
    for card in shown:
        picture = _thumbnail(card.preview) if card.preview else None
        inner = (f'<img src="{picture}" alt="">' if picture else
                 ('&#9881;' if card.kind == "lora" else '&#9998;'))  # gear / pencil glyphs of DejaVu
        kind = "LoRA" if card.kind == "lora" else "Embedding"
        parts.append(
            f'<div class="extra-card" role="button" tabindex="0" data-kind="{card.kind}" '
            f'data-name="{html.escape(card.name)}" data-tag="{html.escape(card.tag)}" data-target="{tab}_prompt" '
            f'title="{html.escape(card.tag)}"><div class="preview">{inner}</div>'
            f'<div class="name">{html.escape(card.name)}</div><div class="kind">{kind}</div></div>')
    body = "".join(parts) or '<div class="extra-note">(nothing matches)</div>'
    note = ""
    if hidden:
        names = ", ".join(c.name for c in hidden)
        note = (f'<div class="extra-note">{len(hidden)} not shown: made for another kind of checkpoint than the '
                f'one selected ({html.escape(names)}).</div>')
    return f'<div class="extra-cards">{body}</div>{note}'


@dataclass
class Panel:
    """The panel's components; `render` redraws the cards (after a checkpoint switch or a rescan)."""
    html: gr.HTML
    search: gr.Textbox
    tab: str

    def render(self, webui, query: str = "") -> str:
        return cards_html(webui, self.tab, query)


def panel(webui, tab: str, prompt: gr.Textbox) -> Panel:
    """Cards under the prompts: search filters them; a click (handled in the page, see common.js) toggles the
    card's tag in `prompt`, as in A1111."""
    with gr.Accordion("Extra networks (LoRA, embeddings)", open=False, elem_id=f"{tab}_extra_networks"):
        with gr.Row():
            search = gr.Textbox(label="Search", placeholder="Filter by name", elem_id=f"{tab}_extra_search",
                                scale=4)
            refresh = icon_button(f"{tab}_extra_refresh", "refresh", "Rescan the LoRA and embedding folders")
        # filled by the page-load event (create_ui's on_page_load): scanning the folders here would only slow the
        # start, since every page load renders the cards afresh anyway
        cards = gr.HTML("", elem_id=f"{tab}_extra_cards")

    def refreshed(query):
        webui.extra_networks.loras.refresh()
        webui.extra_networks.embeddings.refresh()
        return cards_html(webui, tab, query)

    search.change(lambda q: cards_html(webui, tab, q), inputs=[search], outputs=[cards], show_progress="hidden",
                  queue=False)
    refresh.click(refreshed, inputs=[search], outputs=[cards], show_progress="hidden")
    return Panel(cards, search, tab)
