"""Module knockout over windows of layers and the Gini coefficient of per-layer effects (the
cross-architecture study, METHODS.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import interventions as iv
from .._optional import need
from ..model import Model
from ._common import _ids_and_offsets, _softmax_prob, _span, result_html


@dataclass
class KnockoutResult:
    """Module knockout over windows of layers (METHODS.md section 2).

    ``starts`` (n,) window starts; ``layers`` list of the layer ranges knocked out; ``probs`` (n,) the
    clean answer's probability at the last position; ``clean_prob``; ``subject_topk`` (n, k) token ids
    of the readout at the last subject token (final-normed hidden state projected on the INPUT
    embedding matrix), ``clean_topk`` (k,); ``answer``. Objects rates are computed from the top-k lists
    (``factrace.objects``)."""

    kind: str
    window: int
    starts: np.ndarray
    layers: list
    probs: np.ndarray
    clean_prob: float
    subject_topk: np.ndarray
    clean_topk: np.ndarray
    answer: int
    subject_range: tuple

    def _repr_html_(self):
        return result_html(self, figure=None, columns={"start": self.starts, "prob": self.probs, "relative change %":
                                                       (self.probs - self.clean_prob) / self.clean_prob * 100},
                           title=f"KnockoutResult ({self.kind}, window {self.window}): clean p {self.clean_prob:.4f}")

    def to_frame(self):
        pd = need("pandas", "KnockoutResult.to_frame()")

        return pd.DataFrame({"kind": self.kind, "start": self.starts, "window": self.window,
                             "prob": self.probs, "clean_prob": self.clean_prob,
                             "relative_change": (self.probs - self.clean_prob) / self.clean_prob * 100})


def final_norm(m: Model, x: np.ndarray) -> np.ndarray:
    """The model's final norm applied to residual vectors x (..., d), each with its own scale
    (:meth:`Model.final_norm`)."""
    return m.final_norm(x)


def knockout(m: Model, prompt, subject, kind: str = "mlp", window: int = 5, starts=None, exclude_last: bool = True,
             topk: int = 500, target=None, add_special_tokens: bool = True) -> KnockoutResult:
    """Zero the MLP (``kind="mlp"``) or attention (``kind="attn"``) output at all positions in windows of
    ``window`` consecutive layers, one run per window start, all windows batched in one C call.

    Defaults: ``window=5`` (the paper's text; the CAARM reference code blocks 6 layers: pass
    ``window=6``); ``starts``: every start whose window fits, and with ``exclude_last=True`` (reference
    behaviour) no window includes the last layer. Attention knockout zeroes the attention output (the
    clean definition); the reference code's mask-filling variant is not offered (it makes attention
    uniform over future tokens as well). ``topk`` tokens of the last-subject-token readout are kept
    for the objects rate (default 500).

    Example:
        >>> k = factrace.knockout(m, "The Eiffel Tower is located in", "The Eiffel Tower", kind="attn")  # doctest: +SKIP
        >>> k.probs.shape                                                                           # doctest: +SKIP
    """
    if kind not in ("mlp", "attn"):
        raise ValueError("kind must be 'mlp' or 'attn'")
    ids, offs, text = _ids_and_offsets(m, prompt, add_special_tokens)
    b, e = _span(ids, offs, text, subject)
    L = m.config.n_layers
    if not 1 <= window <= L:
        raise ValueError(f"window must be in [1, {L}]")
    if starts is None:
        last_start = L - window - (1 if exclude_last else 0)
        starts = list(range(0, max(0, last_start) + 1)) if last_start >= 0 else []
    starts = [int(s) for s in starts]
    if not starts:
        raise ValueError(f"no knockout window of {window} layers fits a {L}-layer model")
    clean = m.run(ids, capture=["resid_final"], logits="last")
    answer = int(np.argmax(clean.logits[0])) if target is None else int(target)
    clean_prob = float(_softmax_prob(clean.logits, answer)[0])
    ivs = [iv.zero(kind + "_out", layers=range(s, min(L, s + window)), seq=i) for i, s in enumerate(starts)]
    rs = m.run([ids] * len(starts), capture=["resid_final"], interventions=ivs, logits="last")
    probs = np.array([_softmax_prob(r.logits, answer)[0] for r in rs])
    W_E = m.W("W_E")

    def top(x):
        sc = final_norm(m, x) @ W_E.T
        k = min(topk, sc.shape[-1])
        idx = np.argpartition(-sc, k - 1)[:k]
        return idx[np.argsort(-sc[idx], kind="stable")]

    sub = np.stack([top(r.resid_final[e - 1]) for r in rs])
    return KnockoutResult(kind=kind, window=window, starts=np.array(starts), layers=[list(range(s, min(L, s + window)))
                          for s in starts], probs=probs, clean_prob=clean_prob, subject_topk=sub,
                          clean_topk=top(clean.resid_final[e - 1]), answer=answer, subject_range=(b, e))


def gini(x) -> float:
    """Gini coefficient of a per-layer effect vector (METHODS.md section 2):
    a = (x - min) / (max - min + 1e-8), G = sum_i sum_j |a_i - a_j| / (2 n sum_i a_i).
    Returns 0.0 for a constant vector (all a_i = 0).

    Example:
        >>> gini([0, 0, 0, 1])
        0.75
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("gini of an empty vector")
    a = (x - x.min()) / (x.max() - x.min() + 1e-8)
    s = a.sum()
    if s == 0:
        return 0.0
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * len(a) * s))

