"""Rendering of explanations: a ranked text table (:func:`format_table`) and a
self-contained HTML report (:func:`render_html`).

Tested in ``tests/test_explain.py``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imrnns._atomic import atomic_file
from imrnns.explain.vocabulary import _WORD_RE, _fold

if TYPE_CHECKING:
    from imrnns.explain.attribution import Explanation, TokenScore

__all__ = ["format_table", "render_html"]


def format_table(explanations: Sequence[Explanation], *, width: int = 72) -> str:
    """A ranked terminal table per explanation: query tokens beside document tokens."""
    lines: list[str] = []
    last_query: str | None = None
    for rank, ex in enumerate(explanations, 1):
        if ex.query_text is not None and ex.query_text != last_query:
            lines.append(f"query: {_clip(ex.query_text, width)}")
            last_query = ex.query_text
        name = ex.document_id or f"pair {rank}"
        lines.append(
            f"  [{name}] base {ex.base_score:+.4f}  IMRNN {ex.imrnn_score:+.4f}  "
            f"delta {ex.score_delta:+.4f}  ({ex.method})"
        )
        if ex.document_text:
            lines.append(f"    {_clip(ex.document_text, width)}")
        lines.append(
            f"    {'#':>3}  {'query token':<18}{'score':>8}{'idf':>6}   "
            f"{'document token':<18}{'score':>8}{'idf':>6}"
        )
        for i in range(max(len(ex.query_tokens), len(ex.document_tokens))):
            left = _cell(ex.query_tokens, i)
            right = _cell(ex.document_tokens, i)
            lines.append(f"    {i + 1:>3}  {left}   {right}")
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(tokens: list[TokenScore], i: int) -> str:
    if i >= len(tokens):
        return " " * 32
    t = tokens[i]
    return f"{_clip(t.token, 17):<18}{t.score:>+8.4f}{t.weight:>6.2f}"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;
max-width:1100px;padding:0 1em;color:#1d2330}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccd}
.meta{color:#556}.text{background:#f7f8fa;padding:.6em .8em;border-radius:6px}
.doc{border:1px solid #dde;border-radius:8px;padding:.8em 1em;margin:1em 0}
.scores span{display:inline-block;margin-right:1.2em}
.up{color:#11772e}.down{color:#b3261e}
mark{border-radius:3px;padding:0 .15em}mark.pos{background:#c9f0d3}mark.neg{background:#f8d0cc}
.tables{display:flex;gap:2em;flex-wrap:wrap}
table{border-collapse:collapse;font-size:.92em}td,th{padding:.15em .6em;text-align:left}
th{border-bottom:1px solid #ccd}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.7em;background:#3c9a5a;border-radius:2px}
.bar.neg{background:#d67b6b}
"""


def render_html(
    explanations: Sequence[Explanation],
    path: str | os.PathLike[str] | None = None,
    *,
    title: str = "IMRNN explanations",
) -> str:
    """A self-contained HTML report (no scripts, no network): query, top documents, their
    scores, the explanation tokens highlighted in the texts and ranked with their scores.

    Returns the HTML; also writes it atomically to ``path`` when given.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<p class="meta">Tokens: cosine between each modulation delta, mapped back to the '
        "encoder's input space with the pseudo-inverse of the projection, and the token's "
        "input embedding. <mark class=pos>green</mark>: the modulation moves towards the "
        "token; <mark class=neg>red</mark>: away from it. Bars: |score| &times; IDF weight "
        "(the ranking key).</p>",
    ]
    groups: list[list[Explanation]] = []
    for ex in explanations:
        if groups and ex.query_text is not None and groups[-1][0].query_text == ex.query_text:
            groups[-1].append(ex)
        else:
            groups.append([ex])
    for g, group in enumerate(groups, 1):
        first = group[0]
        query_marks = {t.token.lower(): t for t in first.query_tokens}
        parts.append(f'<section class="query" id="q{g}"><h2>Query {g}</h2>')
        if first.query_text is not None:
            parts.append(f'<p class="text">{_highlight(first.query_text, query_marks)}</p>')
        for rank, ex in enumerate(group, 1):
            marks = {t.token.lower(): t for t in ex.document_tokens}
            delta_cls = "up" if ex.score_delta >= 0 else "down"
            name = html.escape(ex.document_id or f"document {rank}")
            parts += [
                f'<article class="doc"><h3>#{rank} &middot; {name}</h3>',
                '<p class="scores">'
                f"<span>base score <b>{ex.base_score:+.4f}</b></span>"
                f"<span>IMRNN score <b>{ex.imrnn_score:+.4f}</b></span>"
                f'<span class="{delta_cls}">modulation contribution '
                f"<b>{ex.score_delta:+.4f}</b></span>"
                f'<span class="meta">{html.escape(ex.method)}</span></p>',
            ]
            if ex.document_text is not None:
                parts.append(f'<p class="text">{_highlight(ex.document_text, marks)}</p>')
            parts += [
                '<div class="tables">',
                _token_table("Query tokens", ex.query_tokens),
                _token_table("Document tokens", ex.document_tokens),
                "</div></article>",
            ]
        parts.append("</section>")
    parts.append("</body></html>")
    text = "\n".join(parts) + "\n"
    if path is not None:
        with atomic_file(path, "w") as fh:
            fh.write(text)
        # mkstemp creates 0600; a report is meant to be opened and shared like any file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)
    return text


def _token_table(caption: str, tokens: list[TokenScore]) -> str:
    top = max((t.relevance for t in tokens), default=0.0) or 1.0
    rows = [
        f"<table><caption><b>{html.escape(caption)}</b></caption>",
        "<tr><th>#</th><th>token</th><th>score</th><th>idf</th><th>relevance</th></tr>",
    ]
    for i, t in enumerate(tokens, 1):
        cls = "pos" if t.sign > 0 else "neg"
        width = max(1, round(80 * t.relevance / top))
        rows.append(
            f'<tr class="token" data-token="{html.escape(t.token)}"><td class="num">{i}</td>'
            f'<td><mark class="{cls}">{html.escape(t.token)}</mark></td>'
            f'<td class="num">{t.score:+.4f}</td><td class="num">{t.weight:.2f}</td>'
            f'<td><span class="bar {cls}" style="width:{width}px"></span> '
            f"{t.relevance:.4f}</td></tr>"
        )
    if not tokens:
        rows.append('<tr><td colspan="5" class="meta">no token passed the filter</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _highlight(text: str, marks: dict[str, TokenScore]) -> str:
    """Escape ``text`` and wrap the words that are explanation tokens in ``<mark>``."""
    out: list[str] = []
    pos = 0
    for m in _WORD_RE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        word = m.group(0)
        tok = marks.get(_fold(word)) or marks.get(word)
        if tok is None:
            out.append(html.escape(word))
        else:
            cls = "pos" if tok.sign > 0 else "neg"
            out.append(
                f'<mark class="{cls}" title="{html.escape(tok.token)} {tok.score:+.4f}">'
                f"{html.escape(word)}</mark>"
            )
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)
