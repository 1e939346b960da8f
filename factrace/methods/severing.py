"""Severing (ROME's "frozen MLP / attention" figure, METHODS.md section 1): the hidden state at the last
subject token restored while the MLP or attention outputs there are held at their corrupted values.
Runs on the tracing engine's clean and corrupted runs (``tracing._Tracer``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import interventions as iv
from .._optional import need
from ..model import Model
from ._common import _softmax_prob, result_html
from ._reference import check_reference
from .tracing import _noise_value, _prepare, _Tracer


@dataclass
class SeverResult:
    """Severing at the last subject token: ``effect`` (L,) = score - low_score when the hidden state at
    (e-1, l) is restored while ``frozen`` ("mlp" or "attn") outputs at e-1 in every layer are held at
    their corrupted values; ``unsevered`` (L,) the same without freezing (the hidden trace's row at e-1, from
    the first noise draw in every mode); ``reference`` the preset that ran."""

    effect: np.ndarray
    unsevered: np.ndarray
    low_score: float
    high_score: float
    frozen: str
    subject_range: tuple
    answer: int
    reference_noise: bool
    reference: str | None = None

    def _repr_html_(self):
        return result_html(self, figure=None, columns={"layer": np.arange(len(self.effect)), "effect": self.effect,
                                                       "unsevered": self.unsevered},
                           title=f"SeverResult (frozen {self.frozen})")

    def to_frame(self):
        pd = need("pandas", "SeverResult.to_frame()")

        L = len(self.effect)
        return pd.DataFrame({"layer": np.arange(L), "frozen": self.frozen, "effect": self.effect,
                             "unsevered_effect": self.unsevered})


def sever(m: Model, prompt, subject, frozen: str = "mlp", samples: int = 10, noise="s3", seed: int = 1,
          target=None, reference_noise: bool | None = None, engine: str = "fast", add_special_tokens: bool | None = None,
          noise_subjects=None, reference=None) -> SeverResult:
    """Severing (ROME's "frozen MLP / attention" figure) at the last subject token e-1.

    For each layer l the hidden state at (e-1, l) is restored to its clean value while the ``frozen``
    sub-layer outputs at position e-1 in ALL layers are held at their values in the corrupted run with
    nothing restored. Returns per-layer ``score - low_score``, and ``unsevered``: the same restoration
    without freezing (the hidden trace's row at e-1), always from the first noise draw (the draw of
    ``low_score`` and of the papers' unsevered curve).

    ``reference_noise=False`` (the clean definition): the frozen values come from the same noise draw as
    the run they are put into. ``reference_noise=True`` reproduces ROME's ``trace_with_repatch`` (and
    CAARM's copy), whose random generator is created once per call: the severed run uses the generator's
    second draw while the frozen values (and ``low_score``) come from the first. Default (None): False for
    ``reference=None``, True for the presets.

    ``reference``: ``None``, ``"rome"`` (the notebook ``causal_trace_frozen_mlp_attn.ipynb``:
    ``calculate_last_subject``) or ``"caarm"`` (``severing_effects_analysis.py``, the same functions). The
    presets change: ``reference_noise`` (True), the subject span (``find_token_range``), the ``s<k>`` level
    and the tokenization, as in :func:`factrace.trace` (ROME: the tokenizer's special tokens; CAARM: none).
    Other arguments as :func:`factrace.trace`.

    Example:
        >>> s = factrace.sever(m, "The Eiffel Tower is located in", "The Eiffel Tower", frozen="mlp")  # doctest: +SKIP
        >>> s.effect.shape                                                                         # doctest: +SKIP
        (30,)
    """
    reference = check_reference(reference)
    if reference_noise is None:
        reference_noise = reference is not None
    reference_noise = bool(reference_noise)
    if frozen not in ("mlp", "attn"):
        raise ValueError("frozen must be 'mlp' or 'attn'")
    ids, span, text = _prepare(m, prompt, subject, add_special_tokens, reference)
    level = _noise_value(m, noise, noise_subjects, reference)
    tr = _Tracer(m, ids, span, samples, level, seed, target, reference_noise_draws=2 if reference_noise else 1)
    base = 1 if reference_noise else 0
    e1, T, L, S = tr.e - 1, tr.T, tr.L, tr.S
    site = iv.SITES[frozen + "_out"][0]
    fro = tr.corrupt[0][frozen + "_out"]  # (L, S*T, d), noise draw A
    eff = np.zeros(L)
    unsev = np.zeros(L)
    if engine == "naive":
        for l in range(L):
            for k, freeze in ((0, True), (1, False)):
                # the severed run on the run's own draw; the unsevered one on the first draw
                noised = tr.corrupt[base if freeze else 0]["noised"].reshape(S, tr.e - tr.b, tr.d)
                ivs = [iv.set_values("embed", noised[s], positions=range(tr.b, tr.e), seq=s) for s in range(S)]
                ivs.append(iv.set_values("resid_post", tr.clean_post[l, e1], layers=l, positions=e1))
                if freeze:
                    ivs += [iv.set_values(frozen + "_out", fro[:, s * T + e1][:, None], positions=e1, seq=s)
                            for s in range(S)]
                rs = m.run([tr.ids] * S, interventions=ivs, logits="last")
                p = np.mean([_softmax_prob(r.logits, tr.answer)[0] for r in rs])
                (eff if freeze else unsev)[l] = p - tr.low
    else:
        for l in range(L):
            first = tr.clean_post[l, e1][None]
            if l == L - 1:  # the last block's output at e-1 reaches the answer only if e-1 is the last position
                p = tr.high if e1 == T - 1 else tr.base
                unsev[l] = p - tr.low
                if not reference_noise:
                    eff[l] = unsev[l]
                    continue
            if reference_noise:
                # the frozen values (draw A) differ from the run's own (draw B) in every layer, so the
                # run starts at layer 0 (positions >= e-1) with the hidden restoration as a patch
                hid = iv.SITES["resid_post"][0]
                eff[l] = tr._restore(0, [e1], base=base, patches=lambda ti, s: [
                    (site, j, fro[j, s * T + e1]) for j in range(L)] + [(hid, l, tr.clean_post[l, e1])])[0] - tr.low
            else:  # frozen values equal the run's own up to layer l: start after it; the severed and
                # the unsevered run in one call (position e-1 twice, the frozen values on the first)
                both = tr._restore(l + 1, [e1, e1], first_rows_value=np.concatenate([first, first]), base=base,
                                   patches=lambda ti, s: [(site, j, fro[j, s * T + e1]) for j in range(l + 1, L)]
                                   if ti == 0 else [])
                eff[l], unsev[l] = both[0] - tr.low, both[1] - tr.low
                continue
            if l < L - 1:  # the unsevered restoration: the first draw's run (as the papers' "ordinary" curve)
                unsev[l] = tr._restore(l + 1, [e1], first_rows_value=first, base=0)[0] - tr.low
    return SeverResult(effect=eff, unsevered=unsev, low_score=tr.low, high_score=tr.high, frozen=frozen,
                       subject_range=span, answer=tr.answer, reference_noise=reference_noise, reference=reference)

