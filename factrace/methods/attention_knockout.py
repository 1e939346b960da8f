"""Attention-edge knockout (Geva et al. 2023, "Dissecting Recall"; METHODS.md section 4): edges from the
last position to the subject, the non-subject tokens or itself removed over a window of layers; all
windows of one prompt run as one batched forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import _ids_of, _pd, _plt, _record_fields, _token_id, _tokens, result_html
from .dla import subject_span

KNOCKOUT_KINDS = ("subject", "non_subject", "last")


def knockout_window(layer: int, n_layers: int, window: int = 9) -> range:
    """Layers blocked for the window centred at ``layer``: ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``
    (w = 9: l-4 .. l+4, clipped)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def knockout_keys(T: int, span, kind, position: int | None = None) -> list:
    """Key positions for a knockout kind: ``"subject"`` (the span), ``"non_subject"`` (every position
    before the query outside the subject), ``"last"`` (the query itself), or an explicit list."""
    q = T - 1 if position is None else position
    if not isinstance(kind, str):
        return [int(p) + T if int(p) < 0 else int(p) for p in kind]
    if kind == "last":
        return [q]
    if span is None:
        raise ValueError(f"knockout kind {kind!r} needs a subject")
    b, e = span
    if kind == "subject":
        return [p for p in range(b, e) if p <= q]
    if kind == "non_subject":
        return [p for p in range(q) if not b <= p < e]
    raise ValueError(f"unknown knockout kind {kind!r}; use {KNOCKOUT_KINDS} or a list of positions")


@dataclass
class AttentionKnockoutResult:
    """Attention knockout of one prompt (see :func:`attention_knockout`).

    ``rel_change[kind]`` (L,) = (p_new - p_base) / p_base * 100 for the window centred at each layer;
    ``p_new[kind]`` (L,); ``p_base`` the clean probability of ``target``; ``keys[kind]`` the blocked keys."""

    prompt: str | None
    tokens: list
    subject: tuple | None
    target: int
    target_str: str
    p_base: float
    p_new: dict
    rel_change: dict
    keys: dict
    window: int

    def _repr_html_(self):
        return result_html(self, title=f"AttentionKnockoutResult: p({self.target_str!r}) = {self.p_base:.4f}")

    def frame(self):
        """Tidy frame: kind, layer, window_lo, window_hi, p_base, p_new, rel_change."""
        pd = _pd()
        rows = []
        for kind, v in self.rel_change.items():
            L = len(v)
            for l in range(L):
                w = knockout_window(l, L, self.window)
                rows.append({"kind": kind, "layer": l, "window_lo": w.start, "window_hi": w.stop - 1,
                             "p_base": self.p_base, "p_new": float(self.p_new[kind][l]), "rel_change": float(v[l])})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Knockout curves: relative change (%) per layer, one line per kind. Returns a Figure."""
        return _plot_knockout({k: (v, None) for k, v in self.rel_change.items()}, self.window,
                              f"{self.prompt or ''} -> {self.target_str!r}", ax)


def _plot_knockout(curves, window, title, ax=None):
    Figure = _plt()
    fig = ax.figure if ax is not None else Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for kind, (v, err) in curves.items():
        x = np.arange(len(v))
        ax.plot(x, v, marker="o", ms=3, label=str(kind))
        if err is not None:
            ax.fill_between(x, v - err, v + err, alpha=0.2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"layer (centre of a {window}-layer window)")
    ax.set_ylabel("change of p(top-1) [%]")
    ax.set_title(title[:70], fontsize=8)
    ax.legend(fontsize=7)
    return fig


def _knockout_seqs(m, ids, span, kinds, window, q):
    """(list of id copies, interventions, index: kind -> list of batch rows per layer, keys)."""
    from ..interventions import block_attention

    L = m.config.n_layers
    T = len(ids)
    seqs, ivs, index, keys = [], [], {}, {}
    for kind in kinds:
        name = kind if isinstance(kind, str) else "custom"
        kk = knockout_keys(T, span, kind, q)
        keys[name] = kk
        rows = []
        for l in range(L):
            if not kk:
                rows.append(None)
                continue
            i = len(seqs)
            seqs.append(ids)
            ivs.append(block_attention(list(knockout_window(l, L, window)), queries=[q], keys=kk, seq=i))
            rows.append(i)
        index[name] = rows
    return seqs, ivs, index, keys


def attention_knockout(m, prompt, subject=None, kinds=KNOCKOUT_KINDS, window: int = 9, target=None,
                       position: int = -1) -> AttentionKnockoutResult:
    """Attention-edge knockout (Geva et al. 2023; METHODS.md section 4).

    For each layer l, the edges from the query (default the last position) to a set of keys are removed
    (pre-softmax score -inf, the rest renormalise) in every layer of the window centred at l
    (``window=9``: l-4 .. l+4, clipped). Kinds: ``"subject"``, ``"non_subject"`` (every earlier non-subject
    token), ``"last"`` (the query itself), or a list of positions. Metric: (p_new - p_base) / p_base * 100
    for the clean run's top-1 token (or ``target``). All windows of all kinds run as ONE batched forward
    pass (per-sequence interventions). An empty key set changes nothing.

    Example:
        >>> ko = factrace.attention_knockout(m, "Fact: The Colosseum is in the country of",
        ...                                  subject="The Colosseum")                         # doctest: +SKIP
        >>> ko.frame(); ko.plot()                                                             # doctest: +SKIP
    """
    ids, text = _ids_of(m, prompt)
    T = len(ids)
    q = position + T if position < 0 else position
    span = subject_span(m, text if text is not None else ids, subject)
    clean = m.run(ids[:q + 1], logits="last")
    p_clean = clean.probs[0]
    tgt = int(np.argmax(p_clean)) if target is None else _token_id(m, target)
    p_base = float(p_clean[tgt])
    ids_q = ids[:q + 1]
    seqs, ivs, index, keys = _knockout_seqs(m, ids_q, span, kinds, window, q)
    runs = m.run(seqs, interventions=ivs, logits="last") if seqs else []
    p_new, rel = {}, {}
    for name, rows in index.items():
        p = np.array([p_base if i is None else float(runs[i].probs[0, tgt]) for i in rows])
        p_new[name] = p
        rel[name] = (p - p_base) / p_base * 100.0
    return AttentionKnockoutResult(prompt=text, tokens=_tokens(m, ids_q), subject=span, target=tgt,
                          target_str=_tokens(m, [tgt])[0], p_base=p_base, p_new=p_new, rel_change=rel, keys=keys,
                          window=window)


@dataclass
class DatasetKnockout:
    """Attention knockout over prompts: ``frame`` (prompt, kind, layer, p_base, p_new, rel_change) and
    per-kind mean / 1.96-sigma error of the relative change (``mean[kind]``, ``err[kind]``, (L,))."""

    frame: object
    mean: dict
    err: dict
    window: int
    n: int

    _repr_html_ = result_html

    def plot(self, ax=None):
        """Mean knockout curves with 95% bands. Returns a Figure."""
        return _plot_knockout({k: (self.mean[k], self.err[k]) for k in self.mean}, self.window,
                              f"attention knockout, mean over {self.n} prompts", ax)


def attention_knockout_dataset(m, records, kinds=KNOCKOUT_KINDS, window: int = 9, only_correct: bool = False):
    """:func:`attention_knockout` over prompts (records as in :func:`dla_dataset`; subjects needed for the
    subject / non-subject kinds). ``only_correct``: keep prompts whose top-1 is the record's target.
    Returns :class:`DatasetKnockout`."""
    pd = _pd()
    frames, curves = [], {}
    n = 0
    for rec in records:
        p, subj, tgt, _, _ = _record_fields(rec)
        if only_correct and tgt is not None:
            ids, _ = _ids_of(m, p)
            top = int(np.argmax(m.run(ids, logits="last").logits[0]))
            if top != _token_id(m, tgt):
                continue
        ko = attention_knockout(m, p, subj, kinds=kinds, window=window)
        f = ko.frame()
        f.insert(0, "prompt", p if isinstance(p, str) else str(p))
        frames.append(f)
        for k, v in ko.rel_change.items():
            curves.setdefault(k, []).append(v)
        n += 1
    mean = {k: np.mean(v, 0) for k, v in curves.items()}
    err = {k: 1.96 * np.std(v, 0) / np.sqrt(len(v)) for k, v in curves.items()}
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return DatasetKnockout(frame=frame, mean=mean, err=err, window=window, n=n)



KnockoutResult = AttentionKnockoutResult  # the name this result had before the module was split
