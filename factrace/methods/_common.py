"""Helpers every method shares: prompts to token ids and character offsets, subject spans, target
tokens, token labels, softmax probabilities, record fields, progress bars and the optional plotting and
table libraries.

Example:
    >>> from factrace.methods._common import subject_span
    >>> subject_span(m, "The Eiffel Tower is in", "Eiffel Tower")      # doctest: +SKIP
    (1, 4)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._optional import need

if TYPE_CHECKING:
    from ..model import Model


def _ids_and_offsets(m: Model, prompt, add_special_tokens: bool):
    if isinstance(prompt, str):
        ids, offs = m._tok().encode_with_offsets(prompt, add_special_tokens=add_special_tokens)
        return ids, offs, prompt
    ids = np.asarray(prompt, dtype=np.int32)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("prompt must be a str or a non-empty 1-D sequence of token ids")
    return ids, None, None


def subject_span(m: Model, prompt, subject, add_special_tokens: bool = True) -> tuple:
    """Token span ``(b, e)`` of ``subject`` in ``prompt``: the tokens whose characters overlap the first
    occurrence of the subject string (found with the tokenizer's offsets). ``subject`` may already be a
    ``(b, e)`` span, which is validated and returned.

    Example:
        >>> subject_span(m, "The Eiffel Tower is in", "Eiffel Tower")   # doctest: +SKIP
        (1, 4)
    """
    ids, offs, text = _ids_and_offsets(m, prompt, add_special_tokens)
    return _span(ids, offs, text, subject)


def _span(ids, offs, text, subject) -> tuple:
    T = len(ids)
    if not isinstance(subject, str):
        b, e = (int(x) for x in subject)
        if not 0 <= b < e <= T:
            raise ValueError(f"subject span ({b}, {e}) is not inside a prompt of {T} tokens")
        return b, e
    if text is None:
        raise ValueError("a subject string needs a str prompt (or give the subject as a (b, e) token span)")
    start = text.find(subject)
    if start < 0:
        raise ValueError(f"subject {subject!r} does not occur in the prompt {text!r}")
    if not subject.strip():
        raise ValueError("the subject is empty")
    end = start + len(subject)
    hit = [i for i, (s, t) in enumerate(offs) if t > s and s < end and t > start]
    if not hit:
        raise ValueError(f"subject {subject!r} covers no token of the prompt")
    return hit[0], hit[-1] + 1


def token_embeddings(m: Model, ids) -> np.ndarray:
    """(T, d) float32: what the token-embedding module returns for ``ids`` (Gemma: scaled by sqrt(d)),
    i.e. the site where tracing noise is added (before GPT-2's position embeddings)."""
    rows = m.W_rows("W_E", np.asarray(ids, dtype=np.int64))
    scale = np.float32(m.config.embed_scale)
    return rows * scale if scale != 1 else np.array(rows)


def _softmax_prob(logits: np.ndarray, token: int) -> np.ndarray:
    """(R,) probability of ``token`` under softmax over the full vocabulary of each row of (R, V)."""
    mx = logits.max(-1, keepdims=True)
    z = np.exp(logits - mx).sum(-1, dtype=np.float64)  # exp in float32 (as torch), sum in float64
    return np.exp(logits[:, token].astype(np.float64) - mx[:, 0] - np.log(z))


def _field(r, *names):
    for n in names:
        v = r.get(n) if isinstance(r, dict) else getattr(r, n, None)
        if v is not None:
            return v
    return None


def _progress(it, total, enabled, desc):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc)
    except ImportError:
        import sys

        def gen():
            for i, x in enumerate(it):
                print(f"\r{desc}: {i}/{total}", end="", file=sys.stderr, flush=True)
                yield x
            print(f"\r{desc}: {total}/{total}", file=sys.stderr)

        return gen()



def _ids_of(m, prompt):
    if isinstance(prompt, str):
        return m.encode(prompt), prompt
    ids = np.asarray(prompt, dtype=np.int32).reshape(-1)
    return ids, None


def _tokens(m, ids):
    try:
        return [str(t) for t in m.token_strings(ids)]
    except Exception:  # no tokenizer: label by id
        return [f"<{int(i)}>" for i in ids]


def _char_span(m, prompt: str, text: str, what: str, after: int = 0):
    """Token span [b, e) of the tokens whose character spans overlap the first occurrence of ``text``."""
    tok = m._tok()
    if not hasattr(tok, "encode_with_offsets"):
        raise ValueError(f"{what}: this model's tokenizer gives no character offsets; pass a (b, e) token span")
    start = prompt.find(text, after)
    if start < 0:
        start = prompt.find(text)
    if start < 0 or not text:
        raise ValueError(f"{what} {text!r} does not occur in the prompt {prompt!r}")
    end = start + len(text)
    _, offs = tok.encode_with_offsets(prompt)
    hit = [i for i, (s, e) in enumerate(offs) if e > s and s < end and e > start]
    if not hit:
        raise ValueError(f"{what} {text!r} covers no token of the prompt")
    return hit[0], hit[-1] + 1, end


def _token_id(m, t):
    if isinstance(t, (int, np.integer)):
        t = int(t)
        if not 0 <= t < m.config.vocab_size:
            raise ValueError(f"target token id {t} is outside the vocabulary")
        return t
    if isinstance(t, str):
        ids = m.encode(t, add_special_tokens=False)
        if len(ids) == 0:
            raise ValueError(f"target {t!r} encodes to no token")
        return int(ids[0])
    raise TypeError(f"a target token must be an int id or a string, got {type(t).__name__}")


def resolve_target(m, target, default_id: int | None = None):
    """``(pos_ids, neg_ids, label)`` for a target spec.

    ``target``: None (``default_id``, e.g. the clean top-1 token), a token id, a string (its FIRST token,
    encoded without special tokens; use a leading space for a word after a space), or a pair ``(a, b)``
    for the logit difference ``logit[a] - logit[b]``; ``b`` may be a list for ``logit[a] - mean(logit[b_i])``.
    """
    if target is None:
        if default_id is None:
            raise ValueError("no target given")
        pos, neg = [int(default_id)], []
    elif isinstance(target, (tuple, list)) and len(target) == 2 and not isinstance(target, str):
        a, b = target
        pos = [_token_id(m, a)]
        neg = [_token_id(m, x) for x in b] if isinstance(b, (list, tuple, np.ndarray)) else [_token_id(m, b)]
        if any(x == pos[0] for x in neg):
            import warnings

            warnings.warn("contrast tokens equal to the target token (same first token) are dropped", stacklevel=3)
            neg = [x for x in neg if x != pos[0]]
        if not neg:
            raise ValueError("no contrast token left (empty list, or every one has the target's first token)")
    else:
        pos, neg = [_token_id(m, target)], []
    strs = _tokens(m, pos + neg)
    label = repr(strs[0])
    if neg:
        label += " - " + (repr(strs[1]) if len(neg) == 1 else f"mean({', '.join(repr(s) for s in strs[1:])})")
    return pos, neg, label


def _vocab_direction(m, pos, neg):
    """(d,) float64 unembedding direction of a target: W_U[a] (- mean W_U[b])."""
    u = m.W_rows("W_U", pos).astype(np.float64).sum(0)
    if neg:
        u = u - m.W_rows("W_U", neg).astype(np.float64).mean(0)
    return u


def _target_value(logits_row, pos, neg):
    v = float(np.asarray(logits_row, np.float64)[pos].sum())
    if neg:
        v -= float(np.asarray(logits_row, np.float64)[neg].mean())
    return v


def _pd():
    return need("pandas", "this table")


def _plt():
    """matplotlib's Figure class: figures are built without pyplot, so they work under Agg, in scripts
    and in notebooks (Jupyter renders a returned Figure) without touching the global backend."""
    return need("matplotlib.figure", "this figure").Figure


def _record_fields(rec):
    """(prompt, subject, target, relation_key, object) from a FactRecord, a dict or a tuple."""
    if isinstance(rec, str):
        return rec, None, None, None, None
    if isinstance(rec, (tuple, list)):
        rec = list(rec) + [None] * (3 - len(rec))
        return rec[0], rec[1], rec[2], None, None
    get = rec.get if isinstance(rec, dict) else (lambda k, dflt=None: getattr(rec, k, dflt))
    obj = get("object")
    tgt = get("target")
    if tgt is None and obj is not None:
        tgt = " " + str(obj).lstrip()
    return get("prompt"), get("subject"), tgt, get("relation"), obj



# ----------------------------------------------------------------------------------------------------------
# Jupyter display of results: ``_repr_html_ = result_html`` (or a method calling it with options)


def _html_value(v) -> str:
    """A short text for one field: scalars as they are, arrays / frames / containers by shape."""
    import html

    if isinstance(v, np.ndarray):
        s = f"array {tuple(v.shape)} {v.dtype}"
        if v.size and v.dtype.kind in "fiu":
            s += f", range [{np.nanmin(v):.4g}, {np.nanmax(v):.4g}]" if np.isfinite(v).any() else ", all NaN"
    elif hasattr(v, "columns") and hasattr(v, "shape"):  # a DataFrame (pandas is not imported for this)
        s = f"DataFrame {v.shape[0]} rows x {v.shape[1]} columns"
    elif isinstance(v, (float, np.floating)):
        s = f"{float(v):.6g}"
    elif isinstance(v, dict):
        s = f"dict of {len(v)}: {', '.join(map(str, list(v)[:6]))}{', ...' if len(v) > 6 else ''}"
    elif isinstance(v, (list, tuple)) and (len(v) > 8 or any(isinstance(x, (list, dict, np.ndarray)) for x in v)):
        s = f"{type(v).__name__} of {len(v)}"
    else:
        s = repr(v)
        s = s if len(s) <= 120 else s[:117] + "..."
    return html.escape(s)


def _html_table(rows, header=None) -> str:
    import html

    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _figure_png(fig, dpi: int = 90) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def result_html(obj, figure="plot", columns=None, title: str | None = None, max_rows: int = 64) -> str:
    """HTML for Jupyter's ``_repr_html_`` of any result object (a dataclass): a title, the figure
    (``obj.<figure>()`` as an embedded PNG; ``figure=None`` for none; without matplotlib a note), an
    optional table of ``columns`` ({name: 1-D array}, e.g. one row per layer) and a compact table of the
    fields (scalars as they are, arrays and frames by shape). Never raises: a figure that cannot be drawn
    is replaced by a note. A result class gets it with ``_repr_html_ = result_html``.

    Example:
        >>> t = factrace.trace(m, prompt, subject)     # doctest: +SKIP
        >>> t                                          # in Jupyter: the heatmap and the fields
    """
    import dataclasses
    import html

    name = type(obj).__name__
    parts = [f"<div><b>{html.escape(title or name)}</b>"]
    fn = getattr(obj, figure, None) if isinstance(figure, str) else figure
    if fn is not None:
        try:
            fig = fn()
            parts.append(f'<div><img src="data:image/png;base64,{_figure_png(fig)}" alt="{html.escape(name)} figure"/></div>')
        except Exception as e:  # noqa: BLE001 - a display must not raise
            parts.append(f"<div><i>figure unavailable: {html.escape(' '.join(str(e).split()))}</i></div>")
    if columns:
        cols = {k: np.asarray(v) for k, v in columns.items()}
        n = min(len(v) for v in cols.values())
        rows = [[_html_value(cols[k][i].item() if cols[k].ndim == 1 else cols[k][i]) for k in cols]
                for i in range(min(n, max_rows))]
        if n > max_rows:
            rows.append(["..."] * len(cols))
        parts.append(_html_table(rows, header=list(cols)))
    fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else []
    rows = [[html.escape(f.name), _html_value(getattr(obj, f.name))] for f in fields]
    if rows:
        parts.append(_html_table(rows))
    parts.append("</div>")
    return "".join(parts)
