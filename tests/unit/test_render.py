"""Replies are safe to render as HTML: what a user or a model wrote is shown, never run."""

from __future__ import annotations

from actors.ports import ChatMessage
from infra.services.render import text_html, transcript_html

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)> & "quotes"'


def test_text_is_escaped_and_keeps_its_line_breaks() -> None:
    assert text_html("a < b\nc") == "a &lt; b<br>c"
    rendered = text_html(HOSTILE)
    assert "<script" not in rendered and "<img" not in rendered
    assert "&lt;script&gt;" in rendered and "&quot;quotes&quot;" in rendered


def test_a_transcript_page_has_no_markup_from_its_messages() -> None:
    page = transcript_html(
        "ctx<1>",
        [ChatMessage(role="user", content=HOSTILE), ChatMessage(role="assistant", content=HOSTILE)],
    )
    assert page.count("<script") == 0 and page.count("<img") == 0
    assert page.count("&lt;script&gt;") == 2
    assert "<title>ctx&lt;1&gt;</title>" in page
