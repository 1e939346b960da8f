"""Attribution patching: first-order estimates of activation patching from gradients (METHODS.md section 8),
and checks of those estimates against factrace's exact engine.

* :func:`attribution_patching` — node estimates (Nanda 2023): effect(unit) ~ (a_src - a_base) . dM/da,
  the gradient taken on the base run (denoising: base = corrupted, source = clean; noising: the reverse),
  for every site x layer x position (x head / neuron / key) from one forward and one backward pass; AtP*
  (Kramar et al. 2024): the QK fix (queries and keys through an exact softmax) and GradDrop.
  :meth:`AtPResult.verify` runs exact activation patching of the top-k estimates.
* edge attribution (EAP, EAP-IG) is in :mod:`factrace.methods.edge_attribution`.
* :func:`atp_trace` — causal tracing (ROME) estimated from gradients on the corrupted runs
  (``factrace.trace(..., engine="atp")``), optionally verified exactly on the k most promising cells.

Example:
    >>> r = factrace.attribution_patching(m, "The Eiffel Tower is in", "The Colosseum is in",
    ...                                   sites=["resid_pre", "attn_out", "mlp_out", "z"])   # doctest: +SKIP
    >>> r.scores["z"].shape                      # (L, H) by default for head sites    # doctest: +SKIP
    >>> v = r.verify(20); v.spearman              # exact patching of the 20 largest estimates  # doctest: +SKIP
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import interventions as iv
from ..errors import InputError
from ..model import Model
from ._common import token_embeddings
from .gradients import gradients

RESIDUAL_SITES = ("embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post")
HEAD_SITES = ("q", "k", "v", "z")
NODE_SITES = RESIDUAL_SITES + HEAD_SITES + ("attn", "mlp_post")
DEFAULT_SITES = ("resid_pre", "attn_out", "mlp_out", "z")


def _axes(site) -> tuple:
    """Names of the axes of a site's finest estimate array."""
    if site in RESIDUAL_SITES:
        return ("layer", "position")
    if site in HEAD_SITES:
        return ("layer", "position", "head")
    if site == "attn":
        return ("layer", "head", "position", "key")
    return ("layer", "position", "neuron")


def _default_per(site) -> tuple:
    return ("layer", "head") if site in HEAD_SITES or site == "attn" else ("layer", "position")


# ---------------------------------------------------------------------------------------------
# metrics and small helpers

def _tokens(m, ids):
    if isinstance(ids, str):
        return m.encode(ids)
    a = np.asarray(ids, np.int32)
    if a.ndim != 1 or a.size == 0:
        raise InputError("a prompt must be a str or a non-empty 1-D sequence of token ids")
    return a


def _token_id(m, t):
    if isinstance(t, str):
        ids = m.encode(t, add_special_tokens=False)
        if len(ids) == 0:
            raise InputError(f"{t!r} encodes to no token")
        return int(ids[0])
    return int(t)


def metric_value(logits_row, metric) -> float:
    """The metric of one row of logits (V,) in float64 (as the C backward computes it)."""
    x = np.asarray(logits_row, np.float64)
    k = metric[0]
    if k == "logit":
        return float(x[metric[1]])
    if k == "logit_diff":
        return float(x[metric[1]] - x[metric[2]])
    lse = x.max() + np.log(np.exp(x - x.max()).sum())
    return float(x[metric[1]] - lse) if k == "logprob" else float(np.exp(x[metric[1]] - lse))


def _resolve_metric(m, metric, answer, foil, clean_logits, corrupt_logits) -> tuple:
    """A metric tuple: as given, or built from a kind name with answer (default: the clean run's top token)
    and foil (default: the corrupted run's top token, or the clean run's second if they agree)."""
    if isinstance(metric, (tuple, list)):
        return tuple([metric[0]] + [int(t) for t in metric[1:]])
    if metric not in ("logit", "logprob", "prob", "logit_diff"):
        raise ValueError(f"metric must be 'logit', 'logprob', 'prob', 'logit_diff' or a tuple, got {metric!r}")
    a = int(np.argmax(clean_logits)) if answer is None else _token_id(m, answer)
    if metric != "logit_diff":
        return (metric, a)
    if foil is None:
        b = int(np.argmax(corrupt_logits))
        if b == a:
            b = int(np.argsort(-np.asarray(clean_logits))[1])
    else:
        b = _token_id(m, foil)
    return ("logit_diff", a, b)


def _rank(x):
    """Ranks with ties averaged (float64)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            r[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return r


def spearman(a, b) -> float:
    """Spearman rank correlation of two 1-D arrays (NaN when either is constant or shorter than 2)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return float("nan")
    ra, rb = _rank(a), _rank(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def topk_overlap(est, exact, k: int) -> float:
    """|top-k of |est| and top-k of |exact|| / k over the same units."""
    est, exact = np.abs(np.asarray(est, np.float64).ravel()), np.abs(np.asarray(exact, np.float64).ravel())
    k = min(int(k), len(est))
    if k < 1:
        return float("nan")
    a = set(np.argsort(-est, kind="stable")[:k].tolist())
    b = set(np.argsort(-exact, kind="stable")[:k].tolist())
    return len(a & b) / k


# ---------------------------------------------------------------------------------------------
# estimates

def _fine(site, delta, grad) -> np.ndarray:
    """The finest first-order estimate of one site: the feature axis summed (residual and head sites), or
    elementwise (attention probabilities, MLP neurons); embed as one pseudo-layer (1, T)."""
    p = np.asarray(delta, np.float64) * np.asarray(grad, np.float64)
    if site == "embed":
        return p.sum(-1)[None]
    if site in RESIDUAL_SITES or site in HEAD_SITES:
        return p.sum(-1)
    return p


def aggregate(site, fine, per) -> np.ndarray:
    """Sum a finest estimate over the axes not in ``per`` (names from the site's axes); axes in per's order."""
    axes = _axes(site)
    bad = [a for a in per if a not in axes]
    if bad:
        raise ValueError(f"per={per!r}: the {site!r} site has axes {axes}")
    out = fine.sum(axis=tuple(i for i, a in enumerate(axes) if a not in per))
    kept = [a for a in axes if a in per]
    return np.moveaxis(out, [kept.index(a) for a in per], list(range(len(per)))) if len(per) > 1 else out


def _softmax_masked(S, mask):
    S = np.where(mask, S, -np.inf)
    mx = S.max(-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.where(mask, np.exp(S - mx), 0.0)
    z = e.sum(-1, keepdims=True)
    return e / np.where(z > 0, z, 1.0), e, z[..., 0], mx[..., 0]


def _scores(cfg, q, k):
    """Attention logits (..., Tq, Tk) of queries and keys after norm and rotary, scaled and soft-capped."""
    s = np.einsum("...id,...jd->...ij", q.astype(np.float64), k.astype(np.float64)) * cfg.attn_scale
    cap = getattr(cfg, "attn_softcap", 0.0) or 0.0
    return cap * np.tanh(s / cap) if cap > 0 else s


def qk_fix(cfg, src_run, base_run, grad_attn, site) -> np.ndarray:
    """AtP*'s QK fix for the ``q`` or ``k`` site: the change of the attention probabilities when one query
    (key) takes its source value, computed exactly through the softmax, times dM/d(probabilities):
    (L, T, H) for q, (L, T, KV) for k. grad_attn (L, H, T, T) from the base run."""
    L, H, KV, dh = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    T = base_run.q_cache.shape[1]
    out = np.zeros((L, T, H if site == "q" else KV))
    grp = H // KV
    windows = list(cfg.layer_window or [0] * L)
    for l in range(L):
        i, j = np.arange(T)[:, None], np.arange(T)[None]
        w = windows[l]
        mask = (j <= i) & ((j > i - w) if w else True)
        qs, qb = (r.q_cache[l].reshape(T, H, dh).transpose(1, 0, 2) for r in (src_run, base_run))
        ks, kb = (r.k_cache[l].reshape(T, KV, dh).transpose(1, 0, 2) for r in (src_run, base_run))
        for h in range(H):
            g = h // grp
            G = grad_attn[l, h].astype(np.float64)
            Sb = _scores(cfg, qb[h], kb[g])
            Pb, Eb, Zb, Mb = _softmax_masked(Sb, mask)
            if site == "q":  # row t with the source query
                Pq = _softmax_masked(_scores(cfg, qs[h], kb[g]), mask)[0]
                out[l, :, h] += ((Pq - Pb) * G).sum(-1)
            else:  # column t with the source key: row i's new logit c[i, t] = q_b[i] . k_s[t]
                C = _scores(cfg, qb[h], ks[g])  # (Tq, Tk)
                Ec = np.where(mask, np.exp(np.minimum(C - Mb[:, None], 700.0)), 0.0)
                Zn = Zb[:, None] - Eb + Ec  # (Tq, Tk): row i's normaliser with column t replaced
                A = (Eb * G).sum(-1)[:, None]
                Zs = np.where(Zn > 0, Zn, 1.0)
                Zbs = np.where(Zb > 0, Zb, 1.0)[:, None]
                delta = A * (1.0 / Zs - 1.0 / Zbs) + (Ec - Eb) * G / Zs
                out[l, :, g] += np.where(mask, delta, 0.0).sum(0)
    return out


@dataclass
class VerifyResult:
    """Exact activation patching of the units :meth:`AtPResult.verify` picked.

    ``table``: pandas DataFrame (site, unit indices, estimate, exact); ``spearman``: rank correlation of
    estimate and exact over the verified units (all sites together) and ``per_site`` {site: spearman};
    ``topk_overlap``: with ``full=True`` |top-k estimated & top-k exact| / k over every unit, else over the
    verified units the overlap of the top k/2 (by magnitude); ``sign_agreement``; ``seconds``."""

    table: object
    spearman: float
    per_site: dict
    topk_overlap: float
    sign_agreement: float
    seconds: float
    full: bool = False


@dataclass
class AtPResult:
    """Attribution-patching estimates (see :func:`attribution_patching`).

    ``estimates`` {site: array shaped by ``per[site]``}: the estimated change of the metric when the unit
    takes its source value (denoising: patched - corrupted; noising: patched - clean); ``scores``: normalised
    (M_base + estimate - M_corrupted) / (M_clean - M_corrupted) (1 = the clean behaviour, 0 = the corrupted);
    ``graddrop`` {site: magnitude} with AtP*'s GradDrop (else None); ``clean_metric``, ``corrupted_metric``;
    ``fine`` {site: the finest estimates} (axes ``_axes(site)``); ``per`` {site: axis names}."""

    estimates: dict
    scores: dict
    fine: dict
    per: dict
    clean_metric: float
    corrupted_metric: float
    metric: tuple
    direction: str
    method: str
    graddrop: dict | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)

    def ranking(self, site) -> np.ndarray:
        """What verify ranks by: |estimate|, or GradDrop's magnitude with AtP*."""
        return np.abs(self.graddrop[site]) if self.graddrop is not None else np.abs(self.estimates[site])

    def to_frame(self):
        """Tidy pandas DataFrame: one row per (site, unit) with estimate, score (and graddrop)."""
        import pandas as pd

        rows = []
        for site, est in self.estimates.items():
            idx = np.indices(est.shape).reshape(len(self.per[site]), -1)
            d = {"site": site}
            for name, ix in zip(self.per[site], idx):
                d[name] = ix
            d["estimate"] = est.ravel()
            d["score"] = self.scores[site].ravel()
            if self.graddrop is not None:
                d["graddrop"] = self.graddrop[site].ravel()
            rows.append(pd.DataFrame(d))
        return pd.concat(rows, ignore_index=True)

    def plot(self, site=None, ax=None):
        """Heatmap of one site's normalised scores (2-D ``per``); returns the Figure."""
        import matplotlib
        import matplotlib.pyplot as plt

        site = site or next(iter(self.estimates))
        a = self.scores[site]
        if a.ndim != 2:
            raise ValueError(f"plot needs a 2-D grid; {site} is per {self.per[site]}")
        if ax is None:
            fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * a.shape[1] + 2), max(3.0, 0.25 * a.shape[0] + 1)), dpi=110)
        else:
            fig = ax.figure
        lim = np.nanmax(np.abs(a)) or 1.0
        h = ax.imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_ylabel(self.per[site][0])
        ax.set_xlabel(self.per[site][1])
        ax.set_title(f"{self.method} {self.direction}: {site}", fontsize=9)
        fig.colorbar(h, ax=ax)
        matplotlib.pyplot.close(fig)
        return fig

    def verify(self, k: int = 20, sites=None, full: bool = False, batch: int = 64) -> VerifyResult:
        """Exact activation patching of the ``k`` units with the largest estimates (over ``sites``, default
        every site of the result; with ``full=True`` every unit) and how well the estimates agree.

        Example: ``r.verify(20).spearman``, ``r.verify(10, sites=["z"], full=True).topk_overlap``."""
        import pandas as pd

        t0 = time.perf_counter()
        ctx = self.extra["ctx"]
        sites = list(self.estimates) if sites is None else list(sites)
        cand = []
        for s in sites:
            rk = self.ranking(s)
            for u in np.ndindex(rk.shape):
                cand.append((float(rk[u]), s, u))
        if not full:
            cand = sorted(cand, key=lambda x: -x[0])[:k]
        by_site = {}
        for _, s, u in cand:
            by_site.setdefault(s, []).append(u)
        rows = []
        for s, units in by_site.items():
            exact = exact_patching(ctx["m"], ctx["base_ids"], ctx["src_run"], s, units, self.per[s], self.metric,
                                   ctx["position"], batch) - ctx["base_metric"]
            for u, x in zip(units, exact):
                rows.append(dict({"site": s}, **dict(zip(self.per[s], u)), estimate=float(self.estimates[s][u]),
                                 ranking=float(self.ranking(s)[u]), exact=float(x)))
        table = pd.DataFrame(rows)
        est, ex = table["estimate"].to_numpy(), table["exact"].to_numpy()
        rank_by = table["ranking"].to_numpy() if self.graddrop is not None else est
        per_site = {s: spearman(g["ranking" if self.graddrop is not None else "estimate"],
                                g["exact"].abs() if self.graddrop is not None else g["exact"])
                    for s, g in table.groupby("site")}
        sp = spearman(rank_by, np.abs(ex) if self.graddrop is not None else ex)
        ov = topk_overlap(rank_by, ex, k if full else max(1, len(ex) // 2))
        agree = float(np.mean(np.sign(est) == np.sign(ex))) if len(ex) else float("nan")
        return VerifyResult(table, sp, per_site, ov, agree, time.perf_counter() - t0, full)


# ---------------------------------------------------------------------------------------------
# exact patching (the engine verify calls)

def _unit_intervention(site, src_run, per, unit, seq, src_tok=None):
    """The exact patch of one unit: the site frozen at its source values on the unit's layer, position,
    head, neuron or key (the axes not in ``per`` taken whole)."""
    kw = dict(zip(per, (int(x) for x in unit)))
    layers = kw.get("layer")
    if site == "embed":  # the token embeddings themselves (RunResult.embed includes learned positions)
        pos = [kw["position"]] if "position" in kw else list(range(len(src_run.ids)))
        return iv.set_values("embed", src_tok[pos], positions=pos, seq=seq)
    if site == "attn":  # built directly: the attention site takes heads= and keys=
        lay = (layers,)
        v = np.moveaxis(src_run.attn[[layers]], 1, 2)  # (1, T, H, T)
        pos = (kw["position"],) if "position" in kw else None
        heads = (kw["head"],) if "head" in kw else None
        keys = (kw["key"],) if "key" in kw else None
        if pos is not None:
            v = v[:, list(pos)]
        if heads is not None:
            v = v[:, :, list(heads)]
        if keys is not None:
            v = v[..., list(keys)]
        return iv.Intervention("patch", "attn", "set", lay, pos, np.ascontiguousarray(v, np.float32), heads, None,
                               keys, seq=seq)
    return iv.freeze(site, src_run, layers=layers, positions=kw.get("position"), seq=seq,
                     heads=[kw["head"]] if "head" in kw else None, neurons=[kw["neuron"]] if "neuron" in kw else None)


def exact_patching(m: Model, base_ids, src_run, site, units, per, metric, position=-1, batch: int = 64) -> np.ndarray:
    """The metric of the base prompt with each unit (indices along ``per``) of ``site`` patched to its value in
    ``src_run`` (a RunResult that captured the site), one sequence per unit, ``batch`` sequences per call.

    (factrace.activation_patching, when present, computes whole grids of the same patches; this runs any
    list of units.)"""
    out = np.empty(len(units))
    T = len(base_ids)
    src_tok = token_embeddings(m, src_run.ids) if site == "embed" else None
    logits = "last" if position in (-1, T - 1) else "all"
    for i0 in range(0, len(units), batch):
        chunk = units[i0:i0 + batch]
        ivs = [_unit_intervention(site, src_run, per, u, j, src_tok) for j, u in enumerate(chunk)]
        rs = m.run([base_ids] * len(chunk), interventions=ivs, logits=logits)
        for j, r in enumerate(rs):
            out[i0 + j] = metric_value(r.logits[-1] if logits == "last" else r.logits[position], metric)
    return out


# ---------------------------------------------------------------------------------------------
# node attribution patching

def attribution_patching(m: Model, clean, corrupted, metric="logit_diff", answer=None, foil=None,
                         sites=DEFAULT_SITES, per=None, direction: str = "denoise", method: str = "atp",
                         position: int = -1) -> AtPResult:
    """Attribution patching of every unit of ``sites`` between two prompts of equal token length.

    Args:
        m: a loaded :class:`factrace.Model`.
        clean, corrupted: prompts (str, encoded with special tokens, or token ids) of the same length.
        metric: ``"logit_diff"`` (default), ``"logit"``, ``"logprob"``, ``"prob"`` with ``answer`` (default:
            the clean run's top token) and ``foil`` (logit_diff; default: the corrupted run's top token), or a
            tuple as :func:`factrace.gradients` takes; at ``position`` (default -1, the last).
        sites: node sites (default ``("resid_pre", "attn_out", "mlp_out", "z")``), from embed, resid_pre,
            resid_mid, attn_out, mlp_out, resid_post, q, k, v, z, attn, mlp_post.
        per: the axes kept per unit: a tuple for every site or {site: tuple}; names from layer, position,
            head (q, k, v, z, attn), neuron (mlp_post), key (attn). Default ("layer", "position"), and
            ("layer", "head") for head sites and attn. The estimate of a unit is the sum of its elements'.
        direction: ``"denoise"`` (default: gradient on the corrupted run, the clean value patched in) or
            ``"noise"`` (gradient on the clean run, the corrupted value patched in).
        method: ``"atp"`` (default) or ``"atp*"``: AtP* = the QK fix for q and k (their effect through an exact
            softmax, then linear) and GradDrop (L + 1 backward passes; ``graddrop`` = the mean over layers l
            of |estimate with block l passing no gradient|, times L / (L - 1)).

    Returns: :class:`AtPResult` (``estimates``, ``scores``, ``to_frame()``, ``plot()``, ``verify(k)``).
    Cost: two forward passes and one backward pass (AtP*: L + 1 backward passes over one forward).

    Example:
        >>> r = attribution_patching(m, "The Eiffel Tower is in", "The Colosseum is in")   # doctest: +SKIP
        >>> r.estimates["resid_pre"].shape, r.verify(20).spearman                          # doctest: +SKIP
        ((30, 6), 0.93)
    """
    t0 = time.perf_counter()
    if direction not in ("denoise", "noise"):
        raise ValueError("direction must be 'denoise' or 'noise'")
    if method not in ("atp", "atp*"):
        raise ValueError("method must be 'atp' or 'atp*'")
    cfg = m.config
    sites = [sites] if isinstance(sites, str) else list(sites)
    sites = ["resid_post" if s == "hidden" else s for s in sites]
    bad = [s for s in sites if s not in NODE_SITES]
    if bad:
        raise ValueError(f"unknown site(s) {bad}; sites: {', '.join(NODE_SITES)}")
    if cfg.parallel and "resid_mid" in sites:
        raise InputError(f"{m.name}: parallel-residual blocks have no resid_mid")
    pers = {s: tuple(per[s]) if isinstance(per, dict) and s in per else
            (tuple(per) if per is not None and not isinstance(per, dict) else _default_per(s)) for s in sites}
    ids_c, ids_x = _tokens(m, clean), _tokens(m, corrupted)
    if len(ids_c) != len(ids_x):
        raise InputError(f"clean and corrupted prompts have {len(ids_c)} and {len(ids_x)} tokens; activation "
                         "patching needs equal lengths")
    qkfix = method == "atp*"
    need = set(s for s in sites if s != "resid_post") | ({"q_cache", "k_cache", "attn"} if qkfix else set())
    if "resid_post" in sites:
        need |= {"resid_pre", "resid_final"}
    cap = sorted(need - {"attn"}) + (["attn"] if "attn" in need else [])
    gsites = list(dict.fromkeys(sites + (["attn"] if qkfix and ({"q", "k"} & set(sites)) else [])))
    pre = m.run([ids_c, ids_x], logits="all")
    metric = _resolve_metric(m, metric, answer, foil, pre[0].logits[position], pre[1].logits[position])
    base_ids, src_ids = (ids_x, ids_c) if direction == "denoise" else (ids_c, ids_x)
    src = m.run(src_ids, capture=cap, logits="all")
    L = cfg.n_layers
    drops = [-1] + list(range(L)) if qkfix else None
    g = gradients(m, base_ids, metric, sites=gsites, position=position, capture=cap, drop_layers=drops)
    base = g.runs[0]
    src_metric = metric_value(src.logits[position], metric)
    base_metric = g.metric
    clean_metric, corr_metric = (src_metric, base_metric) if direction == "denoise" else (base_metric, src_metric)

    def value(run, s):
        return run.resid_post if s == "resid_post" else getattr(run, s)

    def fine_of(grads):
        out = {}
        for s in sites:
            if qkfix and s in ("q", "k"):
                out[s] = qk_fix(cfg, src, base, grads["attn"], s)
            else:
                out[s] = _fine(s, value(src, s) - value(base, s), grads[s])
        return out

    if drops is None:
        fine = fine_of({s: g[s] for s in gsites})
        gd = None
    else:
        passes = [fine_of({s: g[s][p] for s in gsites}) for p in range(len(drops))]
        fine = passes[0]
        gd = {s: sum(np.abs(aggregate(s, passes[p][s], pers[s])) for p in range(1, len(drops))) / max(1, L - 1)
              for s in sites}
    est = {s: aggregate(s, fine[s], pers[s]) for s in sites}
    denom = clean_metric - corr_metric
    denom = denom if denom != 0 else float("nan")
    scores = {s: (base_metric + est[s] - corr_metric) / denom for s in sites}
    ctx = dict(m=m, base_ids=base_ids, src_run=src, position=position, base_metric=base_metric)
    return AtPResult(est, scores, fine, pers, clean_metric, corr_metric, metric, direction, method, gd,
                     time.perf_counter() - t0, extra={"ctx": ctx})


# ---------------------------------------------------------------------------------------------
# causal tracing estimated from gradients (trace(..., engine="atp"))

def _window(L, l, w):
    return range(max(0, l - w // 2), min(L, l - (-w // 2)))


def atp_trace_scores(tr, kinds, window: int) -> dict:
    """{kind: (T, L) estimated ROME scores} from one backward pass of the S corrupted rows of a
    :class:`~factrace.methods.tracing._Tracer` (metric: the mean answer probability over the samples):
    low_score + sum over samples of (clean - corrupted_s) . dM/d(site)_s, the site the block output
    (hidden) or the sub-layer outputs over the cell's window of layers (mlp, attn; the sum over the window).
    Rows the tracer does not trace are NaN; rows before the subject low_score (clean equals corrupted)."""
    m, S, T, L, d = tr.m, tr.S, tr.T, tr.L, tr.d
    noised = tr.corrupt[0]["noised"].reshape(S, tr.e - tr.b, d)
    ivs = [iv.set_values("embed", noised[s], positions=range(tr.b, tr.e), seq=s) for s in range(S)]
    sites = [{"hidden": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}[k] for k in kinds]
    g = gradients(m, [tr.ids] * S, ("prob", tr.answer), sites=sites, interventions=ivs, reduce="mean")
    cor = tr.corrupt[0]
    out = {}
    for kind, site in zip(kinds, sites):
        if site == "resid_post":
            clean, corr = tr.clean_post, cor["post"]
        else:
            clean, corr = getattr(tr.clean, site), cor[site]
        corr = corr.reshape(L, S, T, d)
        G = np.stack(g.grads[site], 1)  # (L, S, T, d)
        per_layer = np.einsum("lstd,lstd->lt", (clean[:, None].astype(np.float64) - corr), G.astype(np.float64))
        if kind == "hidden":
            est = per_layer.T
        else:
            cs = np.concatenate([np.zeros((1, T)), np.cumsum(per_layer, 0)])  # window sums by prefix sums
            est = np.stack([cs[w.stop] - cs[w.start] for w in (_window(L, l, window) for l in range(L))], 1)
        scores = tr.empty_scores()
        rows = [t for t in tr.ts]
        scores[rows] = tr.low + est[rows]
        out[kind] = (scores, g.metric)
    return out


def _exact_cells(tr, kind: str, window: int, cells) -> dict:
    """{(t, l): the exact ROME score} of the given cells, through the tracer's restorations (the cells of one
    layer in one call)."""
    L, T = tr.L, tr.T
    res = {}
    by_layer = {}
    for t, l in cells:
        by_layer.setdefault(l, []).append(t)
    for l, ts in sorted(by_layer.items()):
        ts = sorted(ts)
        if kind == "hidden":
            if l == L - 1:  # the last block's output: only the last position reaches the logits
                vals = [tr.high if t == T - 1 else tr.low for t in ts]
            else:
                vals = tr._restore(l + 1, ts, first_rows_value=tr.clean_post[l, ts])
        else:
            site = iv.SITES[kind + "_out"][0]
            clean = tr.clean.mlp_out if kind == "mlp" else tr.clean.attn_out
            w = _window(L, l, window)
            vals = tr._restore(w.start, ts, patches=lambda ti, s, ts=ts, w=w: [(site, j, clean[j, ts[ti]]) for j in w])
        for t, v in zip(ts, vals):
            res[(t, l)] = float(v)
    return res


def atp_trace(m: Model, prompt, subject, kinds, window: int = 10, samples: int = 10, noise="s3", seed: int = 1,
              target=None, add_special_tokens: bool | None = None, noise_subjects=None, positions=None,
              verify_top: int | None = None, replace: bool = False, reference=None, noise_texts=None) -> dict:
    """Causal traces of one fact estimated by attribution patching: {kind: TraceResult}. The arguments are
    :func:`factrace.trace`'s (its ``engine="atp"``); the clean and corrupted runs are the exact engine's
    (the same noise draw, low_score and high_score), then one backward pass of the S corrupted rows gives
    every cell of every kind. ``verify_top=k``: the exact engine on the k cells of each kind with the largest
    estimated indirect effect (|estimate - low_score|); their scores are the exact ones.

    Each result's ``extra``: ``engine`` ("atp"), ``estimate`` (T, L) the estimated scores,
    ``verified`` (T, L) bool, ``exact`` (T, L) (NaN where not verified), ``spearman`` of estimate and exact
    over the verified cells, ``seconds`` {"estimate", "verify"}."""
    from ._reference import _prepare, check_reference
    from .tracing import KINDS, TraceResult, _noise_value, _Tracer

    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {k!r}")
    if samples < 1 or window < 1:
        raise ValueError("samples and window must be >= 1")
    t0 = time.perf_counter()
    reference = check_reference(reference)
    ids, span, text = _prepare(m, prompt, subject, add_special_tokens, reference)
    level = _noise_value(m, noise, noise_subjects, reference, noise_texts)
    tr = _Tracer(m, ids, span, samples, level, seed, target, replace=replace, additive_low=reference is not None,
                 positions=positions)
    est = atp_trace_scores(tr, kinds, window)
    t_est = time.perf_counter() - t0
    toks = m.token_strings(tr.ids) if m.tokenizer is not None else [str(i) for i in tr.ids]
    ans = m.decode([tr.answer]) if m.tokenizer is not None else str(tr.answer)
    out = {}
    for kind in kinds:
        t1 = time.perf_counter()
        grid = est[kind][0]
        scores, exact = grid.copy(), np.full(grid.shape, np.nan)
        verified = np.zeros(grid.shape, bool)
        if verify_top:
            eff = np.abs(np.nan_to_num(grid - tr.low, nan=0.0))
            eff[: tr.b] = 0.0  # nothing to restore before the subject
            flat = [c for c in np.argsort(-eff, axis=None, kind="stable")[: int(verify_top)]]
            cells = [tuple(int(x) for x in np.unravel_index(c, grid.shape)) for c in flat
                     if np.isfinite(grid.flat[c])]
            for (t, l), v in _exact_cells(tr, kind, window, cells).items():
                exact[t, l] = scores[t, l] = v
                verified[t, l] = True
        sp = spearman(grid[verified], exact[verified]) if verified.any() else float("nan")
        out[kind] = TraceResult(scores=scores, low_score=tr.low, high_score=tr.high, subject_range=(tr.b, tr.e),
                                answer=tr.answer, tokens=toks, kind=kind, window=window, noise=tr.level,
                                samples=tr.S, answer_str=ans, prompt=text,
                                extra={"engine": "atp", "estimate": grid, "verified": verified, "exact": exact,
                                       "spearman": sp, "gradient_low_score": est[kind][1],
                                       "seconds": {"estimate": t_est, "verify": time.perf_counter() - t1}})
    return out
