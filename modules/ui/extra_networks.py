"""The txt2img extra-networks panel (LoRA and embedding cards with search; a click inserts the tag),
the per-chunk token counter, and the notice listing prompt tags that were ignored."""
from __future__ import annotations

import html

import gradio as gr


def token_counter_html(text: str, webui=None) -> str:
    """"N/75" as A1111 shows it: the limit grows by 75 per chunk (BREAK, long prompts); tags do not count,
    and an embedding of the current checkpoint counts as its number of vectors."""
    if not text:
        return '<div class="token-counter">0/75</div>'  # no tokenizer (and no transformers import) needed
    from modules import clip_tokenizer, prompts
    embeddings = None
    if webui is not None and getattr(webui, "extra_networks", None) is not None:
        embeddings = webui.extra_networks.embeddings_for(webui.current_checkpoint())[0]
    tokens, limit = prompts.token_counts(text, clip_tokenizer.clip_tokenizer(), embeddings)
    cls = "token-counter over" if tokens > 75 else "token-counter"
    return f'<div class="{cls}" title="{limit // 75} chunk(s) of 75 tokens">{tokens}/{limit}</div>'


def warnings_html(warnings) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f'<div class="error" id="txt2img_network_warnings">Made anyway, but:<ul>{items}</ul></div>'


def _cards(webui, query: str) -> list[list[str]]:
    nets = webui.extra_networks
    query = (query or "").strip().lower()
    cards = [[f"<lora:{info.name}:1>", "LoRA", info.name] for info in nets.loras.list()]
    cards += [[name, "Embedding", name] for name in sorted(nets.embeddings.files())]  # listed, not loaded
    return [c for c in cards if not query or query in c[2].lower()] or [["", "", "(nothing matches)"]]


def panel(webui, prompt: gr.Textbox) -> None:
    """Cards under the prompt: search filters them, a click appends the tag (or embedding name) to the prompt."""
    with gr.Accordion("Extra networks (LoRA, embeddings)", open=False, elem_id="txt2img_extra_networks"):
        with gr.Row():
            search = gr.Textbox(label="Search", placeholder="Filter by name", elem_id="txt2img_extra_search",
                                scale=4)
            refresh = gr.Button("🔄", elem_id="txt2img_extra_refresh", scale=0, min_width=40)
        cards = gr.Dataset(components=[gr.Textbox(visible=False), gr.Textbox(visible=False),
                                       gr.Textbox(visible=False)],
                           headers=["Tag", "Type", "Name"], samples=_cards(webui, ""), type="values",
                           elem_id="txt2img_extra_cards", samples_per_page=24)

    def insert(card, text):
        tag = card[0] if card else ""
        if not tag:
            return gr.update()
        text = text or ""
        return text + (", " if text.strip() and not text.rstrip().endswith(",") else "") + tag

    def refreshed(query):
        webui.extra_networks.loras.refresh()
        webui.extra_networks.embeddings.refresh()
        return gr.Dataset(samples=_cards(webui, query))

    cards.click(insert, inputs=[cards, prompt], outputs=[prompt], show_progress="hidden", queue=False)
    search.change(lambda q: gr.Dataset(samples=_cards(webui, q)), inputs=[search], outputs=[cards],
                  show_progress="hidden", queue=False)
    refresh.click(refreshed, inputs=[search], outputs=[cards], show_progress="hidden")
