"""Safe HTML for what users and models wrote: everything is text, nothing is markup."""

from __future__ import annotations

import html
from collections.abc import Iterable

from actors.ports import ChatMessage

# No script, style or plugin may run on these pages, whatever a reply contains.
CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; base-uri 'none';"
    " form-action 'none'"
)


def text_html(text: str) -> str:
    """`text` as HTML that shows exactly those characters (escaped; line breaks kept)."""
    return html.escape(text, quote=True).replace("\n", "<br>")


def transcript_html(context_id: str, messages: Iterable[ChatMessage]) -> str:
    """A conversation as a self-contained HTML page; model replies are never trusted as HTML."""
    rows = "\n".join(
        f'<div class="msg {html.escape(m.role)}"><b>{html.escape(m.role)}</b>'
        f"<p>{text_html(m.content)}</p></div>"
        for m in messages
    )
    title = text_html(context_id)
    return (
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{title}</title><style>body{{font:14px sans-serif;max-width:50em;margin:2em auto}}"
        ".msg{margin:1em 0}.user b{color:#246}.assistant b{color:#462}</style></head>"
        f"<body><h1>Context {title}</h1>\n{rows}\n</body></html>"
    )
