"""Activation patching between prompts and path patching (METHODS.md section 7; Heimersheim & Nanda 2024,
"How to use and interpret activation patching"; Wang et al. 2022 for path patching).

Two prompts of the same token length, ``clean`` and ``corrupted``. *Denoising* (default) runs the corrupted
prompt and patches one clean activation in (one cell of a grid); *noising* runs the clean prompt with one
corrupted activation. The metric is read at the last position; the score of a cell is

    (metric(patched) - metric(corrupted)) / (metric(clean) - metric(corrupted))

in both directions: denoising, 1 = the cell restores the clean behaviour, 0 = no effect; noising,
1 = no effect, 0 = the cell alone destroys it.

The engine works like causal tracing's (:class:`factrace.methods.tracing._Tracer`): the run patched into
(the *base*: the corrupted run when denoising) is computed once, capturing every block's input and its
key/value cache. A cell patching layer l at position t starts at block l with the base run's inputs of
rows t .. T-1; the keys and values of the positions before t come from the base run's cache (a patch at t
cannot change them); only the last row is unembedded. All cells of one layer (or more, up to a chunk
size) run as one batched C call. Cells without a position axis (e.g. per ``("layer", "head")``) start at
block l with every position.

Example:
    >>> r = factrace.activation_patching(m, "The Eiffel Tower is in the city of",
    ...                                  "The Colosseum is in the city of", site="resid_pre")  # doctest: +SKIP
    >>> r.scores.shape            # (layers, positions)                                     # doctest: +SKIP
    >>> r.plot(); r.to_frame()                                                              # doctest: +SKIP
    >>> h = factrace.activation_patching(m, clean, corrupted, site="z", per=("layer", "head"))  # doctest: +SKIP
"""
from __future__ import annotations

import html as _html
import itertools
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from .. import interventions as iv
from ..errors import InputError
from ._common import _pd, _plt, _tokens, resolve_target

AXES = ("layer", "position", "head", "neuron")
METRICS = ("logit_diff", "logit", "prob", "logprob")
_HEAD_SITES = ("q", "k", "v", "z", "attn")


# ---------------------------------------------------------------------------------------------------------
# results

def _html_table(title, rows, note=""):
    """A minimal HTML summary (title, key/value rows, optional note) for notebooks."""
    body = "".join(f"<tr><th style='text-align:left'>{_html.escape(str(k))}</th><td>{_html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return (f"<div><b>{_html.escape(title)}</b><table>{body}</table>"
            + (f"<small>{_html.escape(note)}</small>" if note else "") + "</div>")


@dataclass
class PatchingResult:
    """The result of :func:`activation_patching`.

    ``scores``: the normalised grid, one axis per entry of ``per`` in that order (e.g. (L, T) for
    ``("layer", "position")``, (L, H) for ``("layer", "head")``; k/v heads are key-value heads); cells not
    computed (outside ``layers=`` / ``positions=`` / ``heads=`` / ``neurons=``) are NaN.
    ``raw``: the metric of each patched run (same shape). ``clean_metric`` / ``corrupted_metric``: the
    metric of the unpatched clean and corrupted runs. ``site``, ``per``, ``direction`` ("denoise" or
    "noise"), ``metric`` (its name), ``answer`` / ``foil`` token ids, ``tokens`` (clean prompt) and
    ``corrupted_tokens``; ``labels[axis]`` the index labels of each axis.
    """

    scores: np.ndarray
    raw: np.ndarray
    clean_metric: float
    corrupted_metric: float
    site: str
    per: tuple
    direction: str
    metric: str
    answer: tuple = ()
    foil: tuple = ()
    tokens: list = field(default_factory=list)
    corrupted_tokens: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_frame(self):
        """Tidy pandas DataFrame: one row per cell, a column per axis of ``per`` (``layer``, ``position``,
        ``head``, ``neuron``), ``token`` / ``corrupted_token`` when there is a position axis, ``score`` and
        ``raw``."""
        pd = _pd()
        idx = np.meshgrid(*[np.arange(n) for n in self.scores.shape], indexing="ij")
        d = {a: ix.ravel() for a, ix in zip(self.per, idx)}
        if "position" in self.per:
            p = d["position"]
            d["token"] = np.asarray(self.tokens, dtype=object)[p]
            if self.corrupted_tokens:
                d["corrupted_token"] = np.asarray(self.corrupted_tokens, dtype=object)[p]
        d["score"] = self.scores.ravel()
        d["raw"] = self.raw.ravel()
        df = pd.DataFrame(d)
        df["site"] = self.site
        return df

    def top(self, k: int = 10):
        """The ``k`` cells with the largest |score|, as a DataFrame (see :meth:`to_frame`)."""
        df = self.to_frame()
        return df.reindex(df["score"].abs().sort_values(ascending=False).index).head(k)

    def plot(self, ax=None, title=None):
        """Heatmap of ``scores`` (layers down, positions or heads across; tokens as position labels), a line
        for one axis; three axes are drawn as rows (layer, head) x positions. Returns a matplotlib Figure."""
        Figure = _plt()
        s = self.scores
        fig = ax.figure if ax is not None else Figure(figsize=(max(4.5, 0.45 * (s.shape[-1] if s.ndim > 1 else 8) + 2),
                                                              max(3.0, 0.22 * (s.shape[0] if s.ndim == 2 else
                                                                               (s.shape[0] * s.shape[1] if s.ndim == 3 else 10)) + 1.2)),
                                                      layout="constrained")
        ax = ax if ax is not None else fig.subplots()
        per = list(self.per)
        what = f"{self.site} patching ({self.direction})"
        if s.ndim == 1:
            ax.plot(np.arange(len(s)), s, marker="o")
            ax.set_xlabel(per[0])
            ax.set_ylabel("normalised metric")
            if per[0] == "position":
                ax.set_xticks(np.arange(len(s)))
                ax.set_xticklabels(self.tokens, rotation=60, fontsize=7)
        else:
            grid = s if s.ndim == 2 else s.reshape(-1, s.shape[-1])
            v = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-max(v, 1e-9), vmax=max(v, 1e-9), aspect="auto",
                           interpolation="nearest")
            if per[-1] == "position":
                ax.set_xticks(np.arange(grid.shape[1]))
                ax.set_xticklabels(self.tokens, rotation=60, fontsize=7)
            ax.set_xlabel(per[-1])
            if s.ndim == 3:
                ax.set_ylabel(f"{per[0]}, {per[1]}")
                ticks = np.arange(0, grid.shape[0], max(1, s.shape[1]))
                ax.set_yticks(ticks)
                ax.set_yticklabels([f"{per[0][0].upper()}{i // s.shape[1]}" for i in ticks], fontsize=7)
            else:
                ax.set_ylabel(per[0])
            fig.colorbar(im, ax=ax, label="normalised metric")
        ax.set_title(title or what, fontsize=9)
        return fig

    def _repr_html_(self):
        rows = [("site", self.site), ("per", " x ".join(self.per) + f" {tuple(self.scores.shape)}"),
                ("direction", self.direction), ("metric", self.metric),
                ("clean / corrupted metric", f"{self.clean_metric:.4f} / {self.corrupted_metric:.4f}")]
        if np.isfinite(self.scores).any():
            i = np.unravel_index(np.nanargmax(np.abs(self.scores)), self.scores.shape)
            rows.append(("strongest cell", ", ".join(f"{a} {int(j)}" for a, j in zip(self.per, i))
                         + f": {self.scores[i]:.3f}"))
        return _html_table("PatchingResult", rows)


# ---------------------------------------------------------------------------------------------------------
# the metric

class _Metric:
    """The metric of a last-position logits row (V,): logit difference, logit, probability, log-probability
    of the answer, or a callable."""

    def __init__(self, m, metric, answer, foil, clean_logits, corrupted_logits):
        self.fn = metric if callable(metric) else None
        self.name = getattr(metric, "__name__", "callable") if callable(metric) else metric
        if self.fn is None and metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS} or a callable(logits (V,)) -> float, got {metric!r}")
        a = int(np.argmax(clean_logits)) if answer is None else answer
        pos, neg = [], []
        if self.fn is None:
            if metric == "logit_diff":
                if foil is None:  # the corrupted run's top token, or its best other than the answer
                    order = np.argsort(-np.asarray(corrupted_logits, np.float64))
                    pa = resolve_target(m, a)[0][0]
                    foil = int(next(t for t in order if t != pa))
                pos, neg, _ = resolve_target(m, (a, foil))
            else:
                pos, neg, _ = resolve_target(m, a)
        self.pos, self.neg, self.metric = pos, neg, metric

    def __call__(self, logits) -> np.ndarray:
        """(n,) metric of logits rows (n, V)."""
        x = np.atleast_2d(np.asarray(logits))
        if self.fn is not None:
            return np.array([float(self.fn(row)) for row in x])
        x64 = x.astype(np.float64)
        if self.metric == "logit_diff":
            return x64[:, self.pos].sum(1) - x64[:, self.neg].mean(1)
        if self.metric == "logit":
            return x64[:, self.pos].sum(1)
        mx = x.max(1, keepdims=True)
        lse = mx[:, 0].astype(np.float64) + np.log(np.exp(x - mx).sum(1, dtype=np.float64))
        lp = x64[:, self.pos[0]] - lse
        return lp if self.metric == "logprob" else np.exp(lp)


# ---------------------------------------------------------------------------------------------------------
# shared set-up

def _pair_ids(m, clean, corrupted):
    def ids_of(p):
        return m.encode(p) if isinstance(p, str) else np.asarray(p, np.int32).reshape(-1)

    a, b = ids_of(clean), ids_of(corrupted)
    if len(a) != len(b):
        ta = _tokens(m, a)
        tb = _tokens(m, b)
        raise InputError(f"clean and corrupted prompts must have the same number of tokens: clean has {len(a)} "
                         f"{ta}, corrupted has {len(b)} {tb}; rephrase one (activation patching pairs positions)")
    if len(a) == 0:
        raise InputError("empty prompts")
    return a.astype(np.int32), b.astype(np.int32)


def _site_capture(m, site):
    return {"resid_post": ["resid_pre", "resid_final"]}.get(site, [site])


def _axis_sizes(m, site, T):
    c = m.config
    return {"layer": c.n_layers, "position": T,
            "head": c.n_kv_heads if site in ("k", "v") else c.n_heads, "neuron": c.d_mlp}


def _check_per(site, per):
    per = (per,) if isinstance(per, str) else tuple(per)
    bad = [a for a in per if a not in AXES]
    if bad or len(set(per)) != len(per) or not per:
        raise ValueError(f"per must be a non-empty tuple of distinct axes from {AXES}, got {per!r}")
    if "head" in per and site not in _HEAD_SITES:
        raise ValueError(f"per 'head' needs a head site ({', '.join(_HEAD_SITES)}), not {site!r}")
    if "neuron" in per and site != "mlp_post":
        raise ValueError("per 'neuron' needs site='mlp_post'")
    if site == "embed" and "layer" in per:
        raise ValueError("the 'embed' site has no layers: per=('position',)")
    if site != "embed" and "layer" not in per:
        raise ValueError(f"per must include 'layer' for site {site!r} (patch one layer at a time)")
    return per


def _select(sel, n, what):
    if sel is None:
        return list(range(n))
    out = sorted({int(x) % n if -n <= int(x) < n else int(x) for x in np.atleast_1d(sel)})
    if out and (out[0] < 0 or out[-1] >= n):
        raise IndexError(f"{what} {out[-1]} out of range (0 .. {n - 1})")
    return out


# ---------------------------------------------------------------------------------------------------------
# activation patching

def activation_patching(m, clean, corrupted, site: str = "resid_pre", metric="logit_diff", answer=None, foil=None,
                        per=("layer", "position"), direction: str = "denoise", layers=None, positions=None,
                        heads=None, neurons=None, engine: str = "fast", max_cells: int = 128) -> PatchingResult:
    """Activation patching of one site between two prompts, over a grid of cells.

    Args:
        m: a :class:`factrace.Model`.
        clean, corrupted: prompts (str, encoded with special tokens) or token ids; they must have the same
            number of tokens (InputError otherwise).
        site: any site of :mod:`factrace.interventions`: ``embed``, ``resid_pre``, ``resid_mid``,
            ``attn_out``, ``mlp_out``, ``resid_post``, ``q``, ``k``, ``v``, ``z``, ``attn``, ``mlp_post``.
        metric: at the last position: ``"logit_diff"`` (default: ``logit[answer] - logit[foil]``; foil may
            be a list: its mean), ``"logit"``, ``"prob"``, ``"logprob"`` of ``answer``, or a callable
            ``f(logits (V,) float32) -> float``.
        answer: token id or string (its first token; mind the leading space); default the clean run's
            top-1 token. foil: default the corrupted run's top-1 token (or its best other than answer).
        per: the grid's axes, in the order of ``scores``' axes: ``("layer", "position")`` (default; (L, T)),
            ``("layer", "head")`` ((L, H); a head site: the head at every position; KV heads for k / v),
            ``("layer", "head", "position")``, ``("layer",)`` (every position of the layer), ``("layer",
            "neuron")`` (mlp_post), ``("position",)`` (embed). An axis not in ``per`` is patched whole.
        direction: ``"denoise"`` (default: run corrupted, patch clean values in) or ``"noise"`` (run clean,
            patch corrupted values in).
        layers, positions, heads, neurons: restrict the cells computed (default all; the others are NaN).
        engine: ``"fast"`` (default, see the module doc) or ``"naive"`` (every cell a full run of the public
            API; for tests).
        max_cells: cells per C call at most (memory: one logits row of V floats per cell).

    Returns: :class:`PatchingResult` (``scores`` shaped by ``per``, ``raw``, ``clean_metric``,
    ``corrupted_metric``, ``site``, ``per``, ``to_frame()``, ``plot()``).

    Example:
        >>> r = factrace.activation_patching(m, "Fact: The Colosseum is in the country of",
        ...                                  "Fact: The Eiffel Tower is in the country of",
        ...                                  answer=" Italy", foil=" France")      # doctest: +SKIP
        >>> r.scores.shape, r.scores[:, -1].max()                                         # doctest: +SKIP
        ((30, 11), 1.0)
    """
    site = iv._site(site)
    per = _check_per(site, per)
    if direction not in ("denoise", "noise"):
        raise ValueError("direction must be 'denoise' or 'noise'")
    if engine not in ("fast", "naive"):
        raise ValueError("engine must be 'fast' or 'naive'")
    if site == "resid_mid" and m.config.parallel:
        raise ValueError(f"{m.name}: parallel-residual blocks have no resid_mid; patch attn_out or resid_pre")
    cid, kid = _pair_ids(m, clean, corrupted)
    T = len(cid)
    base_ids, src_ids = (kid, cid) if direction == "denoise" else (cid, kid)
    # the two unpatched runs: base with its cache, source with the site
    base = m.run(base_ids, capture=["resid_pre", "k_cache", "v_cache"], logits="last")
    src = m.run(src_ids, capture=_site_capture(m, site), logits="last")
    clean_logits, cor_logits = (src.logits[0], base.logits[0]) if direction == "denoise" else (base.logits[0], src.logits[0])
    met = _Metric(m, metric, answer, foil, clean_logits, cor_logits)
    mc, mk = float(met(clean_logits)[0]), float(met(cor_logits)[0])

    sizes = _axis_sizes(m, site, T)
    sel = {"layer": _select(layers, sizes["layer"], "layer"), "position": _select(positions, T, "position"),
           "head": _select(heads, sizes["head"], "head"), "neuron": _select(neurons, sizes["neuron"], "neuron")}
    shape = tuple(sizes[a] for a in per)
    raw = np.full(shape, np.nan)
    cells = list(itertools.product(*[sel[a] for a in per]))
    cell_dicts = [dict(zip(per, cell)) for cell in cells]
    if engine == "naive":
        for cd, cell in zip(cell_dicts, cells):
            r = m.run(base_ids, interventions=[_cell_intervention(site, src, cd)], logits="last")
            raw[cell] = met(r.logits)[0]
    else:
        _fast_cells(m, site, base, base_ids, src, cell_dicts, cells, raw, met, max_cells)
    denom = mc - mk
    if abs(denom) < 1e-12:
        warnings.warn("the clean and corrupted metrics are equal: normalised scores are NaN", stacklevel=2)
        scores = np.full(shape, np.nan)
    else:
        scores = (raw - mk) / denom
    labels = {a: list(range(sizes[a])) for a in per}
    return PatchingResult(scores=scores, raw=raw, clean_metric=mc, corrupted_metric=mk, site=site, per=per,
                          direction=direction, metric=met.name, answer=tuple(met.pos), foil=tuple(met.neg),
                          tokens=_tokens(m, cid), corrupted_tokens=_tokens(m, kid), labels=labels,
                          extra={"T": T, "cells": len(cells)})


def _cell_intervention(site, src, cd, rebase: int = 0, seq=None):
    """The patch of one cell: the site at the cell's layer / position / head / neuron takes the source
    run's values (a :func:`factrace.interventions.freeze`), positions re-based by ``rebase``."""
    layers = None if site == "embed" else [cd["layer"]]
    pos = [cd["position"]] if "position" in cd else None
    heads = [cd["head"]] if "head" in cd else None
    neurons = [cd["neuron"]] if "neuron" in cd else None
    x = iv.freeze(site, src, layers=layers, positions=pos, heads=heads, neurons=neurons, seq=seq)
    if rebase and pos is not None:
        x = replace(x, positions=(cd["position"] - rebase,))
    return x


def _fast_cells(m, site, base, base_ids, src, cell_dicts, cells, raw, met, max_cells):
    """Every cell a sequence of rows t0 .. T-1 (t0: the cell's position, or 0) entering block l (the cell's
    layer; the embeddings for ``embed``) from the base run's inputs, earlier keys and values from its cache;
    cells grouped by entry layer, ``max_cells`` per C call; only the last row of each is unembedded."""
    c = m.config
    T = len(base_ids)
    w_pos = m.W("W_pos") if c.learned_pos else None
    groups = {}
    for cd, cell in zip(cell_dicts, cells):
        groups.setdefault(-1 if site == "embed" else cd["layer"], []).append((cd, cell))
    for layer, items in groups.items():
        for i0 in range(0, len(items), max_cells):
            chunk = items[i0:i0 + max_cells]
            t0s = [cd.get("position", 0) for cd, _ in chunk]
            lens = np.array([T - t for t in t0s], np.int32)
            ivs = [_cell_intervention(site, src, cd, rebase=t, seq=i) for i, ((cd, _), t) in enumerate(zip(chunk, t0s))]
            kw = iv.compile_interventions(ivs, lens, c, starts=t0s, w_pos=w_pos)
            last = (np.cumsum(lens) - 1).astype(np.int64)
            cap = {"logits": np.empty((len(chunk), c.vocab_size), np.float32)}
            common = dict(seq_starts=np.array(t0s, np.int32), prefix_k=base.k_cache, prefix_v=base.v_cache,
                          prefix_rows=np.zeros(len(chunk), np.int64), capture=cap, logit_rows=last, **kw)
            if layer < 0:
                m._core.forward(lens, ids=np.concatenate([base_ids[t:] for t in t0s]), **common)
            else:
                x = np.ascontiguousarray(np.concatenate([base.resid_pre[layer, t:] for t in t0s]))
                m._core.forward(lens, resid_in=x, start_layer=int(layer), **common)
            vals = met(cap["logits"])
            for (_, cell), v in zip(chunk, vals):
                raw[cell] = v


# ---------------------------------------------------------------------------------------------------------
# path patching

@dataclass
class PathPatchingResult:
    """The result of :func:`path_patching`. ``scores``: (L, H) one normalised score per sender head (with
    ``senders=None``) or a 0-d array (the given senders together); ``raw`` the metric of each patched run;
    ``clean_metric``, ``corrupted_metric``; ``receivers`` ("logits" or a list of (layer, head)),
    ``receiver_input`` (the receivers' inputs patched: a subset of q, k, v), ``direction``, ``metric``."""

    scores: np.ndarray
    raw: np.ndarray
    clean_metric: float
    corrupted_metric: float
    senders: object
    receivers: object
    receiver_input: tuple
    direction: str
    metric: str
    extra: dict = field(default_factory=dict)

    def to_frame(self):
        """One row per sender head (layer, head, score, raw), or one row for a sender set."""
        pd = _pd()
        if self.scores.ndim == 0:
            return pd.DataFrame([{"senders": str(self.senders), "score": float(self.scores), "raw": float(self.raw)}])
        L, H = self.scores.shape
        ll, hh = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
        return pd.DataFrame({"layer": ll.ravel(), "head": hh.ravel(), "score": self.scores.ravel(),
                             "raw": self.raw.ravel()})

    def plot(self, ax=None, title=None):
        """(layer x head) heatmap of the sender scores. Returns a Figure."""
        Figure = _plt()
        fig = ax.figure if ax is not None else Figure(figsize=(5, 4), layout="constrained")
        ax = ax if ax is not None else fig.subplots()
        s = np.atleast_2d(self.scores)
        v = max(1e-9, np.nanmax(np.abs(s))) if np.isfinite(s).any() else 1.0
        im = ax.imshow(s, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto", interpolation="nearest")
        ax.set_xlabel("sender head")
        ax.set_ylabel("sender layer")
        rec = "logits" if isinstance(self.receivers, str) else f"{len(self.receivers)} receiver heads"
        ax.set_title(title or f"path patching -> {rec} ({self.direction})", fontsize=9)
        fig.colorbar(im, ax=ax, label="normalised metric")
        return fig

    def _repr_html_(self):
        rec = self.receivers if isinstance(self.receivers, str) else f"heads {self.receivers} via {self.receiver_input}"
        return _html_table("PathPatchingResult", [
            ("senders", "every head" if self.scores.ndim else self.senders), ("receivers", rec),
            ("direction", self.direction), ("metric", self.metric),
            ("clean / corrupted metric", f"{self.clean_metric:.4f} / {self.corrupted_metric:.4f}"),
            ("scores", f"shape {self.scores.shape}, max |score| "
                       f"{np.nanmax(np.abs(self.scores)) if np.isfinite(self.scores).any() else float('nan'):.3f}")])


def path_patching(m, clean, corrupted, senders=None, receivers="logits", receiver_input=("q", "k", "v"),
                  metric="logit_diff", answer=None, foil=None, direction: str = "denoise",
                  max_cells: int = 64) -> PathPatchingResult:
    """Path patching (Wang et al. 2022): the effect of sender heads on the receivers through the residual
    stream only.

    The *base* run is the corrupted prompt (``direction="denoise"``; the clean one for ``"noise"``), the
    *source* the other prompt. Step 1: run the base prompt with the senders' z (every position) set to
    their source values and every other head's z and every MLP's output frozen at their base values, so the
    residual stream differs from the base run by the senders' output differences alone (Gemma's post-norms
    excepted, which renormalise the sum of heads). With ``receivers="logits"`` the metric of this run is the
    result. Otherwise step 2: the receiver heads' inputs ``receiver_input`` (their q, k and / or v, KV heads
    for k / v) are taken from step 1 and patched into a plain base run, whose metric is the result.

    Args:
        senders: None (default: each head of the model alone: scores (L, H)) or a list of (layer, head)
            patched together (a 0-d score).
        receivers: ``"logits"`` or a list of (layer, head) (query heads; their k / v inputs are those of the
            key-value heads they read).
        receiver_input: a subset of ``("q", "k", "v")``.
        metric, answer, foil, direction: as in :func:`activation_patching`; scores normalised the same way
            ((patched - corrupted) / (clean - corrupted)).
        max_cells: sender cells per C call.

    Returns: :class:`PathPatchingResult`.

    Example:
        >>> p = factrace.path_patching(m, clean, corrupted, receivers=[(9, 6), (9, 9)],
        ...                            receiver_input=("q",))                           # doctest: +SKIP
        >>> p.scores.shape                                                               # doctest: +SKIP
        (12, 12)
    """
    if direction not in ("denoise", "noise"):
        raise ValueError("direction must be 'denoise' or 'noise'")
    c = m.config
    L, H, KV = c.n_layers, c.n_heads, c.n_kv_heads
    cid, kid = _pair_ids(m, clean, corrupted)
    T = len(cid)
    base_ids, src_ids = (kid, cid) if direction == "denoise" else (cid, kid)
    base = m.run(base_ids, capture=["resid_pre", "z", "mlp_out", "q", "k", "v"], logits="last")
    src = m.run(src_ids, capture=["z"], logits="last")
    clean_logits, cor_logits = (src.logits[0], base.logits[0]) if direction == "denoise" else (base.logits[0], src.logits[0])
    met = _Metric(m, metric, answer, foil, clean_logits, cor_logits)
    mc, mk = float(met(clean_logits)[0]), float(met(cor_logits)[0])
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ValueError("receivers must be 'logits' or a list of (layer, head)")
    rin = (receiver_input,) if isinstance(receiver_input, str) else tuple(receiver_input)
    if not to_logits:
        receivers = [(int(l) % L, int(h) % H) for l, h in receivers]
        if not rin or any(x not in ("q", "k", "v") for x in rin):
            raise ValueError("receiver_input must be a subset of ('q', 'k', 'v')")
    single = senders is not None
    sender_sets = [[(int(l) % L, int(h) % H) for l, h in senders]] if single else \
        [[(l, h)] for l in range(L) for h in range(H)]
    if single and not sender_sets[0]:
        raise ValueError("senders: an empty list")
    end = L if to_logits else max(l for l, _ in receivers) + 1
    base_metric = mk if direction == "denoise" else mc
    raw = np.full(len(sender_sets), np.nan)
    groups = {}  # sender sets by their first layer (the run starts there); those that reach no receiver: base
    for j, ss in enumerate(sender_sets):
        if to_logits or any(sl < rl for sl, _ in ss for rl, _ in receivers):
            groups.setdefault(min(l for l, _ in ss), []).append(j)
        else:
            raw[j] = base_metric
    g = H // KV
    for start, idx in sorted(groups.items()):
        for i0 in range(0, len(idx), max_cells):
            js = idx[i0:i0 + max_cells]
            n = len(js)
            lens = np.full(n, T, np.int32)
            last = (np.arange(1, n + 1) * T - 1).astype(np.int64)
            # step 1: senders from the source run, every other head and every MLP frozen at the base run
            ivs = []
            for i, j in enumerate(js):
                ss = sender_sets[j]
                for l in range(start, end):
                    mine = [h for sl, h in ss if sl == l]
                    others = [h for h in range(H) if h not in mine]
                    if others:
                        ivs.append(iv.freeze("z", base, layers=[l], heads=others, seq=i))
                    if mine:
                        ivs.append(iv.freeze("z", src, layers=[l], heads=mine, seq=i))
                    if to_logits or l < end - 1:
                        ivs.append(iv.freeze("mlp_out", base, layers=[l], seq=i))
            kw = iv.compile_interventions(ivs, lens, c)
            x = np.ascontiguousarray(np.tile(base.resid_pre[start], (n, 1)))
            if to_logits:
                cap = {"logits": np.empty((n, c.vocab_size), np.float32)}
                m._core.forward(lens, resid_in=x, start_layer=int(start), capture=cap, logit_rows=last, **kw)
                vals = met(cap["logits"])
            else:
                cap = {s: np.empty((L, n * T, (H if s == "q" else KV) * c.d_head), np.float32) for s in rin}
                m._core.forward(lens, resid_in=x, start_layer=int(start), end_layer=int(end), capture=cap, **kw)
                # step 2: a plain base run with the receivers' inputs from step 1
                ivs2 = []
                for i in range(n):
                    for s in rin:
                        w = H if s == "q" else KV
                        for hh, rl in sorted({(rh if s == "q" else rh // g, rl) for rl, rh in receivers}):
                            val = cap[s][rl, i * T:(i + 1) * T].reshape(T, w, c.d_head)[:, hh]
                            ivs2.append(iv.set_values(s, val[None, :, None], layers=[rl], heads=[hh], seq=i))
                rstart = min(rl for rl, _ in receivers)
                kw2 = iv.compile_interventions(ivs2, lens, c)
                x2 = np.ascontiguousarray(np.tile(base.resid_pre[rstart], (n, 1)))
                cap2 = {"logits": np.empty((n, c.vocab_size), np.float32)}
                m._core.forward(lens, resid_in=x2, start_layer=int(rstart), capture=cap2, logit_rows=last, **kw2)
                vals = met(cap2["logits"])
            raw[js] = vals
    denom = mc - mk
    scores = (raw - mk) / denom if abs(denom) > 1e-12 else np.full_like(raw, np.nan)
    shape = () if single else (L, H)
    return PathPatchingResult(scores=scores.reshape(shape), raw=raw.reshape(shape), clean_metric=mc,
                              corrupted_metric=mk, senders=senders, receivers=receivers, receiver_input=rin,
                              direction=direction, metric=met.name, extra={"T": T})
