"""The Extensions tab: installed extensions (enable/disable, applied at the next start), what failed to load,
"Check for updates", and install from a git URL (the clone is shown with its install.py, which runs only when the
user confirms). Install and update are locked while the server is reachable from other machines unless it was
started with --enable-insecure-extension-access."""
from __future__ import annotations

import html
import logging

import gradio as gr

from modules.core import cmd_args
from modules.core import extensions as ext_mod
from modules.core.options import OptionError

log = logging.getLogger("webui.ui")

LOCKED = ("Installing and updating extensions is disabled: this server can be reached from other machines "
          "(--listen or --server-name). Start it with --enable-insecure-extension-access to allow it.")


def install_allowed(args) -> bool:
    return bool(getattr(args, "enable_insecure_extension_access", False)) or not cmd_args.is_exposed(args)


def _table(webui, statuses: dict[str, str] | None = None) -> str:
    statuses = statuses or {}
    rows = []
    for ext in webui.scripts.extensions:
        v = ext.version()
        state = "enabled" if ext.enabled else f"disabled ({ext.why_disabled})"
        problems = "<br>".join(html.escape(e) for e in ext.errors)
        rows.append(
            f"<tr data-extension='{html.escape(ext.name)}'><td>{html.escape(ext.name)}</td>"
            f"<td>{'built-in' if ext.builtin else 'installed'}</td><td>{html.escape(state)}</td>"
            f"<td>{html.escape(v['remote'])}</td><td>{html.escape(v['commit'])} {html.escape(v['date'])}</td>"
            f"<td>{html.escape(statuses.get(ext.name, ''))}</td>"
            f"<td class='extension-errors'>{problems}</td></tr>")
    if not rows:
        return "<p id='extensions_none'>No extensions installed.</p>"
    return ("<table id='extensions_table'><thead><tr><th>Extension</th><th>Kind</th><th>State</th><th>URL</th>"
            "<th>Version</th><th>Update</th><th>Problems</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _problems(webui) -> str:
    found = webui.scripts.problems()
    if not found:
        return ""
    items = "".join(f"<li><b>{html.escape(ext or 'scripts/')}</b> {html.escape(src)}: {html.escape(msg)}</li>"
                    for src, ext, msg in found)
    return f"<div class='notice-error' id='extensions_problems'><p>Skipped because they failed:</p><ul>{items}</ul></div>"


def create_tab(webui) -> None:
    allowed = install_allowed(webui.args)
    names = [e.name for e in webui.scripts.extensions]
    with gr.Tab("Installed", id="extensions_installed", elem_id="tab_extensions_installed"):
        gr.HTML(_problems(webui), elem_id="extensions_problem_list")
        enabled = gr.CheckboxGroup(names, value=[e.name for e in webui.scripts.extensions if e.enabled],
                                   label="Enabled extensions", elem_id="extensions_enabled")
        with gr.Row():
            apply = gr.Button("Apply (takes effect at the next start)", variant="primary", elem_id="extensions_apply")
            check = gr.Button("Check for updates", elem_id="extensions_check", interactive=allowed)
        notice = gr.HTML("" if allowed else f"<p class='notice-warn'>{LOCKED}</p>", elem_id="extensions_notice")
        table = gr.HTML(_table(webui), elem_id="extensions_list")
    with gr.Tab("Install from URL", id="extensions_install", elem_id="tab_extensions_install"):
        if not allowed:
            gr.HTML(f"<p class='notice-warn' id='extensions_install_locked'>{LOCKED}</p>")
        url = gr.Textbox(label="URL for extension's git repository", elem_id="extensions_url", interactive=allowed)
        name = gr.Textbox(label="Local directory name (empty: from the URL)", elem_id="extensions_dirname",
                          interactive=allowed)
        install = gr.Button("Install", variant="primary", elem_id="extensions_install_button", interactive=allowed)
        result = gr.HTML("", elem_id="extensions_install_result")
        plan = gr.Markdown("", elem_id="extensions_install_plan")
        pending = gr.State("")
        with gr.Row(visible=False) as confirm_row:
            confirm = gr.Button("Run install.py", variant="primary", elem_id="extensions_install_confirm")
            skip = gr.Button("Do not run it", elem_id="extensions_install_skip")

    def on_apply(chosen):
        disabled = [n for n in names if n not in (chosen or [])]
        try:
            webui.options.update({"disabled_extensions": disabled})
        except OptionError as e:
            gr.Warning(str(e))
            return f"<p class='notice-error'>{html.escape(str(e))}</p>"
        return (f"<p id='extensions_applied'>Saved: {len(disabled)} disabled ({html.escape(', '.join(disabled) or 'none')}). "
                "Restart the server to apply.</p>")

    apply.click(on_apply, inputs=[enabled], outputs=[notice])

    def on_check():
        if not install_allowed(webui.args):
            gr.Warning(LOCKED)
            return gr.update()
        statuses = {e.name: ext_mod.check_for_update(e) for e in webui.scripts.extensions if not e.builtin}
        return _table(webui, statuses)

    check.click(on_check, outputs=[table])

    def on_install(link, dirname):
        if not install_allowed(webui.args):
            gr.Warning(LOCKED)
            return f"<p class='notice-error'>{LOCKED}</p>", "", "", gr.update(visible=False)
        try:
            path = ext_mod.clone(link or "", webui.folders.data_dir / "extensions", dirname or None)
        except ext_mod.ExtensionError as e:
            gr.Warning(str(e))
            return f"<p class='notice-error'>{html.escape(str(e))}</p>", "", "", gr.update(visible=False)
        ext = ext_mod.Extension(path.name, path, False)
        has_install = ext.install_script is not None
        text = (f"<p id='extensions_installed_ok'>Installed into {html.escape(str(path))}. "
                + ("Read its install.py below, then run it or not. " if has_install else "")
                + "Restart the server to load it.</p>")
        return text, ext_mod.install_plan(ext) if has_install else "", str(path) if has_install else "", \
            gr.update(visible=has_install)

    install.click(on_install, inputs=[url, name], outputs=[result, plan, pending, confirm_row])

    def on_confirm(path):
        if not install_allowed(webui.args) or not path:
            return "<p class='notice-error'>Nothing to run.</p>", gr.update(visible=False)
        from pathlib import Path
        ext = ext_mod.Extension(Path(path).name, Path(path), False)
        try:
            output = ext_mod.run_install(ext)
        except ext_mod.ExtensionError as e:
            gr.Warning(str(e))
            return f"<p class='notice-error'>{html.escape(str(e))}</p>", gr.update(visible=False)
        return (f"<p id='extensions_install_ran'>install.py finished. Restart the server to load the extension.</p>"
                f"<pre>{html.escape(output[-4000:])}</pre>"), gr.update(visible=False)

    confirm.click(on_confirm, inputs=[pending], outputs=[result, confirm_row])
    skip.click(lambda: ("<p>install.py was not run.</p>", gr.update(visible=False)), outputs=[result, confirm_row])
