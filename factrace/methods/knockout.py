"""Module knockout over windows of layers and the Gini coefficient of per-layer effects (the
cross-architecture study, METHODS.md section 2).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import interventions as iv
from .._optional import need
from ..model import Model
from ._common import _softmax_prob, result_html
from ._reference import _prepare, check_reference, special_tokens


@dataclass
class KnockoutResult:
    """Module knockout over windows of layers (METHODS.md section 2).

    ``starts`` (n,) window starts; ``layers`` list of the layer ranges knocked out; ``probs`` (n,) the
    clean answer's probability at the last position; ``clean_prob``; ``subject_topk`` (n, k) token ids
    of the readout at the last subject token (final-normed hidden state projected on the INPUT
    embedding matrix), ``clean_topk`` (k,); ``answer``. Objects rates are computed from the top-k lists
    (``factrace.objects``); ``reference`` the preset that ran."""

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
    reference: str | None = None

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


def _windows(L, window, starts, exclude_last, partial):
    """(starts, layer lists): a window starting at s blocks layers s .. min(s + window, top) - 1, top = L - 1
    with ``exclude_last`` (no window includes the last layer), else L. Default starts: with ``partial`` every
    s < top (windows shrink at the top, as CAARM's), else those whose window is full."""
    top = L - 1 if exclude_last else L
    if starts is None:
        starts = range(0, top) if partial else range(0, top - window + 1)
    starts = [int(s) for s in starts]
    bad = [s for s in starts if not 0 <= s < top]
    if bad:
        raise ValueError(f"knockout window start {bad[0]} is out of range [0, {top})"
                         + (" (exclude_last: no window includes the last layer)" if exclude_last else ""))
    if not starts:
        raise ValueError(f"no knockout window of {window} layers fits a {L}-layer model")
    return starts, [list(range(s, min(s + window, top))) for s in starts]


def _mlp_without_hidden(m, layer) -> np.ndarray:
    """(d,) what the MLP of ``layer`` adds when its input projection's output is zeroed (CAARM's knockout: a hook
    setting ``up_proj`` / GPT-2's ``c_fc`` output to 0): the output bias (zero when there is none), through the
    post-MLP norm if the architecture has one."""
    d = m.config.d_model
    b = m.W("b_down", layer)
    v = np.zeros(d, np.float32) if b is None else np.asarray(b, np.float32).copy()
    w = m.W("post_mlp_norm_w", layer)
    if w is not None:
        ms = np.float32((v.astype(np.float64) ** 2).mean())
        v = w * (v * (np.float32(1) / np.sqrt(ms + np.float32(m.config.norm_eps))))
    return v


def _block(m, x, lo, hi, patch_values=None, logits=False, v_layer=None):
    """Blocks lo .. hi-1 of one sequence from block-``lo`` inputs x (T, d); ``patch_values``: {layer: (d,) value}
    set as the attention output of every position. Returns (block outputs (T, d), last-position logits (1, V) or
    None, layer ``v_layer``'s values (T, kvd) or None)."""
    c = m.config
    T, d = x.shape
    cap = {"resid_final": np.empty((T, d), np.float32)}
    kw = {}
    if v_layer is not None:
        cap["v_cache"] = np.empty((c.n_layers, T, c.n_kv_heads * c.d_head), np.float32)
    if logits:
        cap["logits"] = np.empty((1, c.vocab_size), np.float32)
        kw["logit_rows"] = np.array([T - 1], np.int64)
    if patch_values:
        lays = sorted(patch_values)
        kw.update(patch_site=np.full(T * len(lays), iv.SITES["attn_out"][0], np.int32),
                  patch_layer=np.repeat(np.array(lays, np.int32), T),
                  patch_row=np.tile(np.arange(T, dtype=np.int64), len(lays)),
                  patch_op=np.zeros(T * len(lays), np.int32),
                  patch_value=np.ascontiguousarray(np.repeat(np.stack([patch_values[j] for j in lays]), T, axis=0),
                                                   dtype=np.float32))
    m._core.forward(np.array([T], np.int32), resid_in=np.ascontiguousarray(x, dtype=np.float32), start_layer=lo,
                    end_layer=hi, capture=cap, **kw)
    return cap["resid_final"], cap.get("logits"), (cap["v_cache"][v_layer] if v_layer is not None else None)


def _uniform_attention_out(m, layer, v) -> np.ndarray:
    """(d,) the attention output of ``layer`` when every query attends uniformly to every position (CAARM's mask
    filled with the dtype minimum: every score + finfo.min rounds to finfo.min): each head mixes the mean of its
    key-value head's values over all positions, through W_O, b_O (and Gemma's post-attention norm)."""
    c = m.config
    vm = v.astype(np.float64).mean(0).astype(np.float32).reshape(c.n_kv_heads, c.d_head)
    z = np.repeat(vm, c.n_heads // c.n_kv_heads, axis=0).reshape(-1)
    out = m.W("W_O", layer) @ z + m.b_O(layer)
    w = m.W("post_attn_norm_w", layer)
    if w is not None:
        ms = np.float32((out.astype(np.float64) ** 2).mean())
        out = w * (out * (np.float32(1) / np.sqrt(ms + np.float32(c.norm_eps))))
    return out.astype(np.float32)


def _mask_filled_runs(m, ids, clean_pre, layer_lists):
    """CAARM's attention knockout, one run per window: in the window's layers the attention is uniform over ALL
    positions (future ones included). Returns [(resid_final (T, d), logits (1, V))]."""
    L = m.config.n_layers
    out = []
    for layers in layer_lists:
        lo = layers[0]
        x = clean_pre[lo]
        for j in layers:  # one block at a time: its values from its (knocked-out-upstream) input
            _, _, v = _block(m, x, j, j + 1, v_layer=j)
            x, lg, _ = _block(m, x, j, j + 1, {j: _uniform_attention_out(m, j, v)}, logits=j + 1 == L)
        if layers[-1] + 1 < L:
            x, lg, _ = _block(m, x, layers[-1] + 1, L, logits=True)
        out.append((x, lg))
    return out


def knockout(m: Model, prompt, subject, kind: str = "mlp", window: int | None = None, starts=None,
             exclude_last: bool = True, topk: int = 500, target=None, add_special_tokens: bool | None = None,
             partial: bool | None = None, reference=None) -> KnockoutResult:
    """Zero the MLP (``kind="mlp"``) or attention (``kind="attn"``) output at all positions in windows of
    ``window`` consecutive layers, one run per window start, all windows batched in one C call.

    Defaults (``reference=None``): ``window=5`` (the paper's text); ``exclude_last=True``: no window includes
    the last layer (a window starting at s blocks s .. min(s + window, L - 1) - 1); ``partial=False``: the
    starts whose window is full (0 .. L - 1 - window); ``partial=True`` adds the starts up to L - 2 with windows
    that shrink at the top (CAARM's curve). Attention knockout zeroes the attention output (the clean
    definition). ``topk`` tokens of the last-subject-token readout (final-normed state on the INPUT embedding
    matrix) are kept for the objects rate (default 500), ranked by a stable sort. ``add_special_tokens``:
    default True.

    ``reference="caarm"`` (``factual_prediction_analysis.py``) changes: ``window=6`` (its
    ``num_block_layers = 5`` blocks ``start .. start + 5``) and ``partial=True`` (starts 0 .. L - 2, the last
    windows shrinking, never the last layer); MLP knockout zeroes the MLP's input projection (``up_proj`` /
    GPT-2's ``c_fc``), so the MLP still adds its output bias (GPT-2's ``c_proj`` bias; nothing for Llama/Qwen);
    attention knockout fills the whole attention mask with the dtype minimum, so attention is uniform over ALL
    positions, future ones included (the last-subject state then depends on later tokens; computed block by
    block here); the subject span is ``find_token_range``'s; the readout ranking is NumPy's default
    ``argsort`` of the float32 scores; tokenization keeps the tokenizer's special tokens (unlike CAARM's
    tracing). ``reference="rome"``: ROME has no knockout; same as None. Explicit arguments override a preset.

    Example:
        >>> k = factrace.knockout(m, "The Eiffel Tower is located in", "The Eiffel Tower", kind="attn")  # doctest: +SKIP
        >>> k.probs.shape                                                                           # doctest: +SKIP
    """
    reference = check_reference(reference)
    caarm = reference == "caarm"
    if kind not in ("mlp", "attn"):
        raise ValueError("kind must be 'mlp' or 'attn'")
    window = (6 if caarm else 5) if window is None else int(window)
    partial = caarm if partial is None else bool(partial)
    ids, (b, e), text = _prepare(m, prompt, subject, special_tokens(reference, add_special_tokens, "knockout"),
                                 reference if caarm else None)
    L = m.config.n_layers
    if not 1 <= window <= L:
        raise ValueError(f"window must be in [1, {L}]")
    starts, layer_lists = _windows(L, window, starts, exclude_last, partial)
    clean = m.run(ids, capture=["resid_final"] + (["resid_pre"] if caarm and kind == "attn" else []), logits="last")
    answer = int(np.argmax(clean.logits[0])) if target is None else int(target)
    clean_prob = float(_softmax_prob(clean.logits, answer)[0])
    if caarm and kind == "attn":
        finals = _mask_filled_runs(m, ids, clean.resid_pre, layer_lists)
        probs = np.array([_softmax_prob(lg, answer)[0] for _, lg in finals])
        states = [x[e - 1] for x, _ in finals]
    else:
        if caarm:  # kind == "mlp": the input projection zeroed
            ivs = [iv.set_values("mlp_out", np.stack([_mlp_without_hidden(m, j) for j in lay])[:, None], layers=lay,
                                 seq=i) for i, lay in enumerate(layer_lists)]
        else:
            ivs = [iv.zero(kind + "_out", layers=lay, seq=i) for i, lay in enumerate(layer_lists)]
        rs = m.run([ids] * len(starts), capture=["resid_final"], interventions=ivs, logits="last")
        probs = np.array([_softmax_prob(r.logits, answer)[0] for r in rs])
        states = [r.resid_final[e - 1] for r in rs]

    def top(x):
        sc = m.project(final_norm(m, x)[None], "W_E")[0]
        k = min(topk, sc.shape[-1])
        if caarm:  # CAARM: np.argsort(-projs) of the float32 projections, default (quicksort) kind
            return np.argsort(-sc)[:k]
        idx = np.argpartition(-sc, k - 1)[:k]
        return idx[np.argsort(-sc[idx], kind="stable")]

    sub = np.stack([top(x) for x in states])
    return KnockoutResult(kind=kind, window=window, starts=np.array(starts), layers=layer_lists, probs=probs,
                          clean_prob=clean_prob, subject_topk=sub, clean_topk=top(clean.resid_final[e - 1]),
                          answer=answer, subject_range=(b, e), reference=reference)


def gini(x, reference=None) -> float:
    """Gini coefficient of a per-layer effect vector (METHODS.md section 2):
    a = (x - min) / (max - min + 1e-8), G = sum_i sum_j |a_i - a_j| / (2 n sum_i a_i).
    Returns 0.0 for a constant vector (all a_i = 0: no concentration). ``reference="caarm"``
    (``gini_coefficient_analysis.gini``): the same formula, and NaN for a constant vector (its 0 / 0);
    ``"rome"``: ROME has no Gini; same as None.

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
        return float("nan") if check_reference(reference) == "caarm" else 0.0
    return float(np.abs(a[:, None] - a[None, :]).sum() / (2 * len(a) * s))

