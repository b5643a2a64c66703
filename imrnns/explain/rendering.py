"""Rendering of explanations: a ranked text table (:func:`format_table`) and a
self-contained HTML report (:func:`render_html`).

Tested in ``tests/explain/test_explain.py``.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from imrnns._atomic import atomic_file
from imrnns.explain.faithfulness import score_meaning
from imrnns.explain.vocabulary import _WORD_RE, _fold

if TYPE_CHECKING:
    from imrnns.explain.attribution import Explanation, TokenScore

__all__ = ["faithfulness_line", "format_table", "render_html"]


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
            f"  [{name}] base {_num(ex.base_score, '+.4f')}  IMRNN {_num(ex.imrnn_score, '+.4f')}  "
            f"delta {_num(ex.score_delta, '+.4f')}  ({ex.method})"
        )
        if ex.document_text:
            lines.append(f"    {_clip(ex.document_text, width)}")
        if ex.attribution is not None:
            lines.append(f"    scores: {_score_meaning(ex)}")
        fidelity = faithfulness_line(ex)
        if fidelity:
            lines.append(f"    faithfulness: {fidelity}")
        words = ex.attribution is not None  # words with effects: no IDF weight to show
        if words:
            header = f"{'query word':<18}{'effect':>8}   {'document word':<18}{'effect':>8}"
        else:
            header = (
                f"{'query token':<18}{'score':>8}{'idf':>6}   "
                f"{'document token':<18}{'score':>8}{'idf':>6}"
            )
        lines.append(f"    {'#':>3}  {header}")
        for i in range(max(len(ex.query_tokens), len(ex.document_tokens))):
            left = _cell(ex.query_tokens, i, words)
            right = _cell(ex.document_tokens, i, words)
            lines.append(f"    {i + 1:>3}  {left}   {right}".rstrip())
        lines.append("")
    return "\n".join(lines).rstrip()


def _cell(tokens: list[TokenScore], i: int, words: bool = False) -> str:
    if i >= len(tokens):
        return " " * (26 if words else 32)
    t = tokens[i]
    cell = f"{_clip(t.token, 17):<18}{_num(t.score, '+.4f'):>8}"
    return cell if words else cell + f"{_num(t.weight, '.2f'):>6}"


def _score_meaning(ex: Explanation) -> str:
    return f"{score_meaning(ex.attribution)} ({ex.method}); + raises it, - lowers it"


def faithfulness_line(ex: Explanation) -> str | None:
    """One sentence with the method's measured faithfulness, or None when unmeasured."""
    f = ex.faithfulness
    if not f:
        return None
    try:
        return (
            f"deleting its top-5 document words lowers the adapter's added score by "
            f"{float(f['added_drop_top5']):+.4f} on average (5 random words "
            f"{float(f['random_top5']):+.4f}, the 5 highest-IDF words {float(f['idf_top5']):+.4f}; "
            f"{f.get('pairs', '?')} SciFact pairs, benchmarks/RESULTS.md)"
        )
    except (KeyError, TypeError, ValueError):
        return None


def _num(x: float, spec: str) -> str:
    """``format(x, spec)``, with NaN and infinities written out rather than formatted."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("+inf" if x > 0 else "-inf")
    return format(x, spec)


def _clean(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8, the report's encoding, cannot encode)
    replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


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

    Texts are escaped, and lone surrogates in them (which UTF-8 cannot encode) become
    U+FFFD; a NaN or infinite score is written as ``nan`` / ``inf`` with an empty bar.

    Returns the HTML; also writes it atomically to ``path`` when given.
    """
    esc = _escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    methods = list(dict.fromkeys(ex.method for ex in explanations))
    if any(ex.attribution is None for ex in explanations):
        parts.append(
            '<p class="meta">Back-projection tokens: cosine between each modulation delta, '
            "mapped back to the encoder's input space with the pseudo-inverse of the "
            "projection, and the token's input embedding. <mark class=pos>green</mark>: the "
            "modulation moves towards the token; <mark class=neg>red</mark>: away from it. "
            "Bars: |score| &times; IDF weight (the ranking key).</p>"
        )
    if any(ex.attribution is not None for ex in explanations):
        parts.append(
            '<p class="meta">Word scores: the signed effect of each word on the adapter\'s '
            "added score (IMRNN score &minus; base score), as the method measures or "
            "estimates it (below). <mark class=pos>green</mark>: the word raises it; "
            "<mark class=neg>red</mark>: it lowers it. Bars: |effect|.</p>"
        )
    parts.append(f'<p class="meta">Method: {esc(", ".join(methods))}</p>')
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
            name = esc(ex.document_id or f"document {rank}")
            parts += [
                f'<article class="doc"><h3>#{rank} &middot; {name}</h3>',
                '<p class="scores">'
                f"<span>base score <b>{_num(ex.base_score, '+.4f')}</b></span>"
                f"<span>IMRNN score <b>{_num(ex.imrnn_score, '+.4f')}</b></span>"
                f'<span class="{delta_cls}">adapter\'s added score '
                f"<b>{_num(ex.score_delta, '+.4f')}</b></span>"
                f'<span class="meta">{esc(ex.method)}</span></p>',
            ]
            if ex.attribution is not None:
                parts.append(f'<p class="meta">Word scores: {esc(_score_meaning(ex))}</p>')
            fidelity = faithfulness_line(ex)
            if fidelity:
                parts.append(f'<p class="meta faithfulness">Faithfulness: {esc(fidelity)}</p>')
            if ex.document_text is not None:
                parts.append(f'<p class="text">{_highlight(ex.document_text, marks)}</p>')
            words = ex.attribution is not None
            noun = "words" if words else "tokens"
            parts += [
                '<div class="tables">',
                _token_table(f"Query {noun}", ex.query_tokens, words),
                _token_table(f"Document {noun}", ex.document_tokens, words),
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


def _escape(text: str) -> str:
    return html.escape(_clean(text))


def _token_table(caption: str, tokens: list[TokenScore], words: bool = False) -> str:
    """Ranked tokens with their scores; for word attributions (``words``) the score is the
    effect on the added score, and the IDF column (always 1) is left out."""
    finite = [t.relevance for t in tokens if math.isfinite(t.relevance)]
    top = max(finite, default=0.0) or 1.0
    head = (
        "<th>#</th><th>word</th><th>effect</th><th>|effect|</th>"
        if words
        else "<th>#</th><th>token</th><th>score</th><th>idf</th><th>relevance</th>"
    )
    rows = [f"<table><caption><b>{_escape(caption)}</b></caption>", f"<tr>{head}</tr>"]
    for i, t in enumerate(tokens, 1):
        cls = "pos" if t.sign > 0 else "neg"
        # A NaN or infinite relevance has no bar length: shown as text, with no bar.
        width = max(1, round(80 * t.relevance / top)) if math.isfinite(t.relevance) else 0
        token = _escape(t.token)
        rows.append(
            f'<tr class="token" data-token="{token}"><td class="num">{i}</td>'
            f'<td><mark class="{cls}">{token}</mark></td>'
            f'<td class="num">{_num(t.score, "+.4f")}</td>'
            + ("" if words else f'<td class="num">{_num(t.weight, ".2f")}</td>')
            + f'<td><span class="bar {cls}" style="width:{width}px"></span> '
            f"{_num(t.relevance, '.4f')}</td></tr>"
        )
    if not tokens:
        empty = "no word in the text" if words else "no token passed the filter"
        rows.append(f'<tr><td colspan="5" class="meta">{empty}</td></tr>')
    rows.append("</table>")
    return "".join(rows)


def _highlight(text: str, marks: dict[str, TokenScore]) -> str:
    """Escape ``text`` and wrap the words that are explanation tokens in ``<mark>``."""
    text = _clean(text)
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
                f'<mark class="{cls}" title="{_escape(tok.token)} {_num(tok.score, "+.4f")}">'
                f"{html.escape(word)}</mark>"
            )
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)
