"""Edge attribution patching (METHODS.md section 8): EAP (Syed et al. 2023) between the embedding, heads and
MLPs and to the logits, score(u -> v) = sum over positions of (u_src - u_base) . dM/d(input of v), from one
forward and one backward pass; EAP-IG (Hanna et al. 2024): the gradient averaged over k points on the line
from corrupted to clean embeddings. :meth:`EdgeResult.verify` patches the top edges exactly.

Example:
    >>> e = factrace.edge_attribution(m, "Fact: The Colosseum is in the country of",
    ...                               "Fact: The Eiffel Tower is in the country of",
    ...                               answer=" Italy", foil=" France")                 # doctest: +SKIP
    >>> e.top(10); e.verify(10).spearman                                                # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from .. import interventions as iv
from ..errors import InputError
from ..model import Model
from ._common import token_embeddings
from .attribution_patching import (VerifyResult, _resolve_metric, _tokens, metric_value,
                                   spearman, topk_overlap)
from .gradients import gradients


@dataclass
class EdgeResult:
    """Edge attribution scores (see :func:`edge_attribution`).

    ``senders`` ["embed", "a{l}.h{h}", "m{l}", ...], ``receivers`` ["a{l}.h{h}.q", "a{l}.g{g}.k",
    "a{l}.g{g}.v", "m{l}", "logits"] (g: key-value heads), ``scores`` (n_senders, n_receivers) the estimated
    change of the metric when the edge alone carries the source run's value (NaN where the sender is not
    upstream of the receiver); ``clean_metric``, ``corrupted_metric``, ``method`` ("eap" or "eap-ig")."""

    senders: list
    receivers: list
    scores: np.ndarray
    clean_metric: float
    corrupted_metric: float
    metric: tuple
    direction: str
    method: str
    seconds: float = 0.0
    extra: dict = field(default_factory=dict, repr=False)

    def to_frame(self):
        """Tidy pandas DataFrame of the valid edges: sender, receiver, score, sorted by |score|."""
        import pandas as pd

        i, j = np.nonzero(np.isfinite(self.scores))
        df = pd.DataFrame({"sender": np.array(self.senders, object)[i], "receiver": np.array(self.receivers, object)[j],
                           "score": self.scores[i, j]})
        return df.reindex(df.score.abs().sort_values(ascending=False).index).reset_index(drop=True)

    def top(self, k: int = 20):
        """The k edges with the largest |score| (a DataFrame)."""
        return self.to_frame().head(k)

    def plot(self, ax=None):
        """Heatmap of the score matrix (senders x receivers); returns the Figure."""
        import matplotlib
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(8, 6), dpi=110)
        else:
            fig = ax.figure
        a = self.scores
        lim = np.nanmax(np.abs(a)) or 1.0
        h = ax.imshow(a, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xlabel("receiver")
        ax.set_ylabel("sender")
        ax.set_title(f"{self.method} {self.direction}", fontsize=9)
        fig.colorbar(h, ax=ax)
        matplotlib.pyplot.close(fig)
        return fig

    def verify(self, k: int = 20) -> VerifyResult:
        """Exact edge patching of the k largest edges whose receiver is the logits or an MLP of a sequential
        block (those edges can be isolated with interventions: the sender's change added where only the
        receiver reads it: resid_post of the last block for the logits; resid_mid and taken back at
        resid_post for an MLP). Edges into heads are not verified (no site isolates one head's input)."""
        import pandas as pd

        t0 = time.perf_counter()
        ctx = self.extra["ctx"]
        m, L = ctx["m"], ctx["m"].config.n_layers
        ok = [j for j, r in enumerate(self.receivers) if r == "logits" or (r.startswith("m") and not m.config.parallel)]
        cand = [(abs(self.scores[i, j]), i, j) for i in range(len(self.senders)) for j in ok
                if np.isfinite(self.scores[i, j])]
        cand = sorted(cand, key=lambda x: -x[0])[:k]
        ivs_all = []
        for _, i, j in cand:
            delta = ctx["deltas"][self.senders[i]].astype(np.float32)  # (T, d)
            r = self.receivers[j]
            if r == "logits":
                ivs = [iv.add("resid_post", delta[None], layers=L - 1)]
            else:
                l = int(r[1:])
                ivs = [iv.add("resid_mid", delta[None], layers=l), iv.add("resid_post", -delta[None], layers=l)]
            ivs_all.append(ivs)
        exact = []
        base_ids, pos, metric = ctx["base_ids"], ctx["position"], self.metric
        for i0 in range(0, len(ivs_all), 32):
            chunk = ivs_all[i0:i0 + 32]
            flat = [dataclasses.replace(x, seq=s) for s, ivs in enumerate(chunk) for x in ivs]
            rs = m.run([base_ids] * len(chunk), interventions=flat, logits="all")
            exact += [metric_value(r.logits[pos], metric) - ctx["base_metric"] for r in rs]
        table = pd.DataFrame({"sender": [self.senders[i] for _, i, _ in cand],
                              "receiver": [self.receivers[j] for _, _, j in cand],
                              "estimate": [float(self.scores[i, j]) for _, i, j in cand], "exact": exact})
        est, ex = table.estimate.to_numpy(), table.exact.to_numpy()
        return VerifyResult(table, spearman(est, ex), {}, topk_overlap(est, ex, max(1, len(ex) // 2)),
                            float(np.mean(np.sign(est) == np.sign(ex))) if len(ex) else float("nan"),
                            time.perf_counter() - t0)


def edge_attribution(m: Model, clean, corrupted, metric="logit_diff", answer=None, foil=None, ig_steps=None,
                     direction: str = "denoise", position: int = -1) -> EdgeResult:
    """Edge attribution patching between the embedding, attention heads and MLPs, and to the logits.

    score(u -> v) = sum over positions of (u_src - u_base) . dM/d(input of v): u's write to the residual
    stream (a head's ``head_out``, an MLP's ``mlp_out``, the token embeddings), v's input the residual stream
    its norm reads, through v alone (a head's query, key or value; an MLP; the final norm for the logits),
    the gradient on the base run (denoising: the corrupted run). The scores of the edges into one receiver
    sum to the node estimate of its input (exactly where the head decomposition is exact: every block but
    Gemma's post-normed attention, whose head_out uses the run's frozen norm scale).

    Args:
        m, clean, corrupted, metric, answer, foil, direction, position: as :func:`attribution_patching`.
        ig_steps: None (EAP) or k (EAP-IG, Hanna et al. 2024): the gradient averaged over the base prompt with
            its token embeddings at base + (i / k) (source - base), i = 1 .. k (one batched backward pass).

    Returns: :class:`EdgeResult` (``scores``, ``to_frame()``, ``top(k)``, ``plot()``, ``verify(k)``).

    Example:
        >>> e = factrace.edge_attribution(m, "When Mary and John went to the store, John gave a drink to",
        ...                               "When Mary and John went to the store, Mary gave a drink to",
        ...                               ig_steps=5)                                    # doctest: +SKIP
        >>> e.top(10)                                                                    # doctest: +SKIP
    """
    t0 = time.perf_counter()
    if direction not in ("denoise", "noise"):
        raise ValueError("direction must be 'denoise' or 'noise'")
    cfg = m.config
    L, H, KV = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
    ids_c, ids_x = _tokens(m, clean), _tokens(m, corrupted)
    if len(ids_c) != len(ids_x):
        raise InputError(f"clean and corrupted prompts have {len(ids_c)} and {len(ids_x)} tokens")
    pre = m.run([ids_c, ids_x], logits="all", capture=["head_out", "mlp_out"])
    metric = _resolve_metric(m, metric, answer, foil, pre[0].logits[position], pre[1].logits[position])
    src, base = (pre[0], pre[1]) if direction == "denoise" else (pre[1], pre[0])
    base_ids, src_ids = (ids_x, ids_c) if direction == "denoise" else (ids_c, ids_x)
    e_src, e_base = token_embeddings(m, src_ids), token_embeddings(m, base_ids)
    sites = ["q_in", "k_in", "v_in", "mlp_in", "resid_post"]
    if ig_steps:
        k = int(ig_steps)
        if k < 1:
            raise ValueError("ig_steps must be >= 1")
        ivs = [iv.set_values("embed", e_base + np.float32(i / k) * (e_src - e_base), seq=i - 1) for i in range(1, k + 1)]
        g = gradients(m, [base_ids] * k, metric, sites=sites, interventions=ivs, position=position, reduce="mean")
        G = {s: np.sum(np.stack(g.grads[s]).astype(np.float64), 0) for s in sites}  # each step weighted 1/k
        gm = factrace_metric(m, base_ids, metric, position)
    else:
        g = gradients(m, base_ids, metric, sites=sites, position=position)
        G = {s: g[s].astype(np.float64) for s in sites}
        gm = g.metric
    src_metric = metric_value(src.logits[position], metric)
    clean_metric, corr_metric = (src_metric, gm) if direction == "denoise" else (gm, src_metric)
    # senders: their change (T, d)
    senders, deltas = ["embed"], {"embed": (e_src.astype(np.float64) - e_base)}
    s_layer = [-1]
    s_kind = ["e"]
    for l in range(L):
        for h in range(H):
            n = f"a{l}.h{h}"
            senders.append(n)
            deltas[n] = src.head_out[l, h].astype(np.float64) - base.head_out[l, h]
            s_layer.append(l)
            s_kind.append("a")
        n = f"m{l}"
        senders.append(n)
        deltas[n] = src.mlp_out[l].astype(np.float64) - base.mlp_out[l]
        s_layer.append(l)
        s_kind.append("m")
    # receivers: their input gradients (T, d)
    receivers, grads, r_layer, r_kind = [], [], [], []
    for l in range(L):
        for h in range(H):
            receivers.append(f"a{l}.h{h}.q")
            grads.append(G["q_in"][l, :, h])
            r_layer.append(l)
            r_kind.append("a")
        for name in ("k", "v"):
            for gh in range(KV):
                receivers.append(f"a{l}.g{gh}.{name}")
                grads.append(G[f"{name}_in"][l, :, gh])
                r_layer.append(l)
                r_kind.append("a")
        receivers.append(f"m{l}")
        grads.append(G["mlp_in"][l])
        r_layer.append(l)
        r_kind.append("m")
    receivers.append("logits")
    grads.append(G["resid_post"][L - 1])
    r_layer.append(L)
    r_kind.append("l")
    D = np.stack([deltas[s].reshape(-1) for s in senders])
    Gm = np.stack([x.reshape(-1) for x in grads])
    scores = D @ Gm.T
    sl, rl = np.array(s_layer)[:, None], np.array(r_layer)[None]
    sk, rk = np.array(s_kind)[:, None], np.array(r_kind)[None]
    # upstream: an earlier layer; a head of the same layer into that layer's MLP (sequential blocks)
    valid = (sl < rl) | ((sl == rl) & (sk == "a") & (rk == "m") & (not cfg.parallel))
    scores = np.where(valid, scores, np.nan)
    ctx = dict(m=m, base_ids=base_ids, position=position, base_metric=gm, deltas=deltas)
    return EdgeResult(senders, receivers, scores, clean_metric, corr_metric, metric, direction,
                      "eap-ig" if ig_steps else "eap", time.perf_counter() - t0, extra={"ctx": ctx})


def factrace_metric(m: Model, ids, metric, position=-1) -> float:
    """The metric of one plain run."""
    return metric_value(m.run(ids, logits="all").logits[position], metric)
