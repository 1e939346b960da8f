"""Gradients of a scalar metric of the logits with respect to activations, from the C backward pass
(csrc/backward.c: one forward pass keeping what the backward needs, then one backward pass per request; no
weight gradients, no torch).

Metrics, each at one position of each sequence (``position``, default the last):

    ``("logit", tok)``          the logit of ``tok`` (after Gemma's final soft-cap, if any)
    ``("logprob", tok)``        log softmax
    ``("prob", tok)``           softmax probability (ROME's score)
    ``("logit_diff", a, b)``    logit(a) - logit(b)

With a batch, ``reduce="sum"`` (default) gives every sequence the gradient of its own metric (sequences do
not interact); ``reduce="mean"`` differentiates the mean over the batch, e.g. ROME's mean answer
probability over the noise samples (:func:`rome_gradients`).

Sites: those of :mod:`factrace.interventions` (``embed``, ``resid_pre``, ``resid_mid``, ``attn_out``,
``mlp_out``, ``resid_post`` / ``hidden``, ``q``, ``k``, ``v``, ``z``, ``attn``, ``mlp_post``), the gradient
taken w.r.t. the value the rest of the model reads there (after that site's interventions), shaped like
the capture of the same name; and for edge attribution the residual-stream input of one node, through
that node alone: ``q_in`` (L, T, H, d) (head h's query), ``k_in`` / ``v_in`` (L, T, KV, d), ``mlp_in``
(L, T, d) (the block input the MLP's norm reads: ``resid_mid``, or ``resid_pre`` in parallel blocks).
``sum(q_in, k_in, v_in over heads) + resid_mid grad == resid_pre grad`` in a sequential block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import _core
from ..errors import InputError
from ..interventions import compile_interventions
from ..model import CAPTURE_NAMES, Model

GRAD_SITES = ("embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "q", "k", "v", "z", "attn",
              "mlp_post", "q_in", "k_in", "v_in", "mlp_in")
METRIC_KINDS = {"logit": _core.METRIC_LOGIT, "logprob": _core.METRIC_LOGPROB, "prob": _core.METRIC_PROB,
                "logit_diff": _core.METRIC_LOGIT_DIFF}


def _metric_spec(metric):
    """(kind id, a, b) of one metric tuple."""
    if not isinstance(metric, (tuple, list)) or not metric or metric[0] not in METRIC_KINDS:
        raise ValueError(f"metric must be ('logit', tok), ('logprob', tok), ('prob', tok) or ('logit_diff', a, b); "
                         f"got {metric!r}")
    kind = metric[0]
    n = 3 if kind == "logit_diff" else 2
    if len(metric) != n:
        raise ValueError(f"metric {kind!r} takes {n - 1} token id(s), got {metric!r}")
    toks = [int(t) for t in metric[1:]]
    return METRIC_KINDS[kind], toks[0], toks[1] if n == 3 else 0


@dataclass
class Gradients:
    """The result of :func:`gradients`.

    ``metric``: the scalar M differentiated (the sum or mean over sequences); ``values`` (S,) each
    sequence's metric; ``grads`` {site: [array per sequence]} shaped like the captures (with
    ``drop_layers``: a leading axis, one entry per pass); ``runs``: the forward pass's captures as
    :class:`RunResult` objects (``capture=``), or None. ``g[site]`` is the array of a single sequence (the
    list for a batch)."""

    metric: float
    values: np.ndarray
    grads: dict
    runs: list | None = None
    single: bool = True
    extra: dict = field(default_factory=dict)

    def __getitem__(self, site):
        site = "resid_post" if site == "hidden" else site
        g = self.grads[site]
        return g[0] if self.single else g


def _site_shapes(cfg, lens):
    L, d, H, KV, dh, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    N = int(np.sum(lens))
    A = int((np.asarray(lens, np.int64) ** 2).sum())
    return {"embed": (N, d), "resid_pre": (L, N, d), "resid_mid": (L, N, d), "attn_out": (L, N, d),
            "mlp_out": (L, N, d), "resid_post": (L, N, d), "q": (L, N, H * dh), "z": (L, N, H * dh),
            "k": (L, N, KV * dh), "v": (L, N, KV * dh), "attn": (L, H, A), "mlp_post": (L, N, F),
            "q_in": (L, N, H, d), "k_in": (L, N, KV, d), "v_in": (L, N, KV, d), "mlp_in": (L, N, d)}


def _split_grad(site, a, lens, row0, cfg):
    """Per-sequence views of one flat gradient array (without the pass axis)."""
    out, aoff = [], 0
    for T, r in zip(lens, row0):
        T, r = int(T), int(r)
        if site == "embed":
            out.append(a[r:r + T])
        elif site == "attn":
            out.append(a[:, :, aoff:aoff + T * T].reshape(a.shape[0], a.shape[1], T, T))
        elif site in ("q", "k", "v", "z"):
            out.append(a[:, r:r + T].reshape(a.shape[0], T, -1, cfg.d_head))
        else:
            out.append(a[:, r:r + T])
        aoff += T * T
    return out


def gradients(m: Model, ids, metric, sites=("resid_pre",), interventions=(), position=-1, reduce: str = "sum",
              capture=(), drop_layers=None) -> Gradients:
    """The gradient of a metric of the logits at one position w.r.t. activations, from one forward and one
    backward pass in C (no torch; the GIL is released; the model's threads).

    Args:
        m: a loaded :class:`factrace.Model`.
        ids: one sequence (token ids (T,) or a str) or a batch (list), as :meth:`Model.run`.
        metric: ``("logit", tok)``, ``("logprob", tok)``, ``("prob", tok)`` or ``("logit_diff", a, b)``;
            or a list of them, one per sequence.
        sites: names from ``GRAD_SITES`` (default ``("resid_pre",)``); ``"hidden"`` = ``"resid_post"``.
        interventions: :mod:`factrace.interventions` applied in the forward pass (the gradient flows through
            each as its transpose: set / zero stop it, add passes it, scale multiplies it).
        position: the metric's position in each sequence (default -1: the last), or a list per sequence.
        reduce: ``"sum"`` (default: M = sum of the sequences' metrics, each sequence gets its own metric's
            gradient) or ``"mean"`` (M = their mean, e.g. ROME's mean over noise samples).
        capture: forward captures to return as well (names of :meth:`Model.run`'s ``capture``), in ``runs``.
        drop_layers: GradDrop (AtP*): a list of layers (or -1 for none); one backward pass each, with that
            block's attention and MLP passing no gradient; every gradient gets a leading axis of that length.

    Returns: :class:`Gradients`; ``g[site]`` shaped like the capture of the same name: ``embed`` (T, d),
    ``resid_*`` / ``attn_out`` / ``mlp_out`` / ``mlp_in`` (L, T, d), ``q`` / ``z`` (L, T, H, dh), ``k`` /
    ``v`` (L, T, KV, dh), ``attn`` (L, H, T, T) (every key, masked ones included, as torch's autograd gives),
    ``mlp_post`` (L, T, F), ``q_in`` (L, T, H, d), ``k_in`` / ``v_in`` (L, T, KV, d).

    Example:
        >>> ids = m.encode("The Eiffel Tower is located in the city of")      # doctest: +SKIP
        >>> g = factrace.gradients(m, ids, ("logprob", m.encode(" Paris", False)[0]),
        ...                        sites=["resid_pre", "z"])                   # doctest: +SKIP
        >>> g["z"].shape, g.metric                                             # doctest: +SKIP
        ((30, 11, 9, 64), -1.73...)
    """
    seqs, single = m._as_batch(ids)
    cfg = m.config
    lens = np.array([len(s) for s in seqs], np.int32)
    row0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    S = len(seqs)
    metrics = metric if (isinstance(metric, list) and metric and isinstance(metric[0], (tuple, list))) else [metric] * S
    if len(metrics) != S:
        raise ValueError(f"{len(metrics)} metrics for {S} sequences")
    specs = [_metric_spec(x) for x in metrics]
    for k, a, b in specs:
        for t in (a, b):
            if not 0 <= t < cfg.vocab_size:
                raise InputError(f"metric token {t} is outside the vocabulary [0, {cfg.vocab_size})")
    poss = list(position) if isinstance(position, (list, tuple, np.ndarray)) else [position] * S
    if len(poss) != S:
        raise ValueError(f"{len(poss)} positions for {S} sequences")
    rows = []
    for s, p in enumerate(poss):
        T = int(lens[s])
        if not -T <= int(p) < T:
            raise IndexError(f"position {p} is outside sequence {s} of {T} tokens")
        rows.append(row0[s] + int(p) % T)
    if reduce not in ("sum", "mean"):
        raise ValueError("reduce must be 'sum' or 'mean'")
    wgt = np.full(S, 1.0 / S if reduce == "mean" else 1.0)
    sites = [sites] if isinstance(sites, str) else list(sites)
    sites = ["resid_post" if x == "hidden" else x for x in sites]
    bad = [x for x in sites if x not in GRAD_SITES]
    if bad:
        raise ValueError(f"unknown gradient site(s) {bad}; sites: {', '.join(GRAD_SITES)}")
    if cfg.parallel and "resid_mid" in sites:
        raise InputError(f"{m.name}: {cfg.arch} has parallel-residual blocks: there is no resid_mid")
    drops = None if drop_layers is None else np.array([-1 if x is None else int(x) for x in drop_layers], np.int32)
    n_pass = 1 if drops is None else len(drops)
    shapes = _site_shapes(cfg, lens)
    grads = {x: np.empty((n_pass,) + shapes[x], np.float32) for x in dict.fromkeys(sites)}

    capture = [capture] if isinstance(capture, str) else list(capture)
    bad = [x for x in capture if x not in CAPTURE_NAMES or x in ("final_scale",)]
    if bad:
        raise ValueError(f"cannot capture {bad} in a gradients() call")
    N = int(lens.sum())
    L, d, H = cfg.n_layers, cfg.d_model, cfg.n_heads
    kvd = cfg.n_kv_heads * cfg.d_head
    cshape = {"embed": (N, d), "resid_pre": (L, N, d), "resid_mid": (L, N, d), "attn_out": (L, N, d),
              "mlp_out": (L, N, d), "head_out": (L, H, N, d), "attn": shapes["attn"], "z": (L, N, H * cfg.d_head),
              "q": (L, N, H * cfg.d_head), "k": (L, N, kvd), "v": (L, N, kvd), "mlp_post": (L, N, cfg.d_mlp),
              "resid_final": (N, d), "k_cache": (L, N, kvd), "v_cache": (L, N, kvd), "norm_scale_attn": (L, N),
              "q_cache": (L, N, H * cfg.d_head)}
    cap = {x: np.empty(cshape[x], np.float32) for x in capture}
    kw = compile_interventions(interventions, lens, cfg) if interventions else {}
    values = np.empty(S, np.float64)
    m._core.backward(lens, ids=np.concatenate(seqs), capture=cap, grads={k: v.reshape(-1) for k, v in grads.items()},
                     seed_row=np.array(rows, np.int64), seed_kind=np.array([k for k, _, _ in specs], np.int32),
                     seed_tok=np.array([[a, b] for _, a, b in specs], np.int64).reshape(S, 2), seed_weight=wgt,
                     metric=values, drop_layers=drops, **kw)
    out = {}
    for x, a in grads.items():
        per = [_split_grad(x, a[k], lens, row0, cfg) for k in range(n_pass)]  # [pass][seq]
        out[x] = [per[0][s] if drops is None else np.stack([per[k][s] for k in range(n_pass)]) for s in range(S)]
    runs = m._split(seqs, lens, row0, cap, None, False) if capture else None
    return Gradients(metric=float((values * wgt).sum()), values=values, grads=out, runs=runs, single=single)


def grad_dot(delta, grad) -> np.ndarray:
    """Sum over the last axis of delta * grad in float64: a first-order estimate per unit."""
    return np.einsum("...i,...i->...", np.asarray(delta, np.float64), np.asarray(grad, np.float64))
