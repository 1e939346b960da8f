"""Reference presets: what ``reference="rome"`` / ``reference="caarm"`` change, shared by the study functions.

``reference=None`` (the default everywhere) is factrace's clean definition of each method. ``"rome"`` reproduces
kmeng01/rome (``experiments/causal_trace.py`` and its notebooks), ``"caarm"`` reproduces
ICT-Convergence-Security-Lab-Chosun/CAARM (``experiments/restoration_effects_analysis.py``,
``severing_effects_analysis.py``, ``factual_prediction_analysis.py``, ``gini_coefficient_analysis.py``), quirks
included. Each function's docstring lists what its preset changes; the pieces they share live here:

* :func:`decoded_span`: the references' ``find_token_range`` (decode every token on its own, join, find the
  subject's first occurrence in that string), instead of the tokenizer's character offsets;
* :func:`special_tokens`: the references' tokenization (ROME: the tokenizer's default special tokens
  everywhere; CAARM: none for tracing, severing, the filter and the noise level, the tokenizer's default for
  knockout);
* :func:`known_1000_subjects`: the subjects of ROME's known_1000 (shipped with factrace), the default subject
  set of the ``"s<k>"`` noise level;
* :func:`torch_std`: ``torch.Tensor.std()`` of a float32 tensor (unbiased, float32 result), as both references
  compute the noise level.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources

import numpy as np

from ._common import _ids_and_offsets, _span

REFERENCES = ("rome", "caarm")


def check_reference(reference):
    """``None``, ``"rome"`` or ``"caarm"`` (case-insensitive); anything else raises ValueError."""
    if reference is None:
        return None
    if isinstance(reference, str) and reference.lower() in REFERENCES:
        return reference.lower()
    if isinstance(reference, str) and reference.lower() in ("none", "factrace", ""):
        return None
    raise ValueError(f"reference must be None, 'rome' or 'caarm', got {reference!r}")


def special_tokens(reference, add_special_tokens, where: str = "trace") -> bool:
    """``add_special_tokens`` when given, else the preset's: True (factrace and ROME: the tokenizer's default,
    ``tokenizer.encode(p)``); CAARM: False, except for knockout (``where="knockout"``), whose script tokenizes with
    ``utils.make_inputs`` (``tokenizer.encode(p)``)."""
    if add_special_tokens is not None:
        return bool(add_special_tokens)
    if reference == "caarm":
        return where == "knockout"
    return True


def decoded_span(m, ids, subject: str) -> tuple:
    """``(b, e)`` as ROME's and CAARM's ``find_token_range``: decode each token on its own, join the strings,
    take the first occurrence of ``subject`` in the joined string; b is the first token whose end passes its
    start, e - 1 the first token whose end reaches its end. Special tokens count with their text (e.g. a BOS
    ``"<|begin_of_text|>"``); a byte-level token holding part of a character decodes to U+FFFD, which shifts
    or hides the subject (the offsets-based span of factrace's default has neither problem)."""
    toks = [m.decode([int(t)]) for t in ids]
    whole = "".join(toks)
    char_loc = whole.find(subject)
    if char_loc < 0:
        raise ValueError(f"subject {subject!r} does not occur in the decoded prompt {whole!r} (find_token_range)")
    loc, b, e = 0, None, None
    for i, t in enumerate(toks):
        loc += len(t)
        if b is None and loc > char_loc:
            b = i
        if e is None and loc >= char_loc + len(subject):
            e = i + 1
            break
    if b is None or e is None or e <= b:
        raise ValueError(f"subject {subject!r} covers no token of the prompt (find_token_range)")
    return b, e


@lru_cache(maxsize=1)
def known_1000_subjects() -> tuple:
    """The 1,209 subjects of ROME's known_1000 dataset in ``known_id`` order, duplicates kept (as both references
    pass ``[k["subject"] for k in knowns]``). Shipped as ``factrace/data/known_1000_subjects.txt`` (one per line);
    source: ROME's ``known_1000.json`` (Meng et al. 2022, rome.baulab.info/data/dsets/known_1000.json), MIT
    license."""
    text = resources.files("factrace").joinpath("data/known_1000_subjects.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.split("\n") if line)


def torch_std(x: np.ndarray) -> float:
    """``torch.Tensor.std()`` of a float32 array as PyTorch's CPU kernel computes it: the mean rounded to float32,
    the squared deviations summed in float64, divided by n - 1 (unbiased), square root, rounded to float32;
    returned as a Python float (``.item()``)."""
    x = np.asarray(x, np.float32).ravel()
    if x.size < 2:
        return float("nan")
    mean = float(np.float32(x.astype(np.float64).mean()))
    dx = x.astype(np.float64) - mean
    return float(np.float32(np.sqrt(float(dx @ dx) / (x.size - 1))))


def _prepare(m, prompt, subject, add_special_tokens, reference):
    """(ids, span, text): the prompt tokenized with the preset's special tokens, the subject's span by the preset's rule
    (offsets for None, :func:`decoded_span` for the presets; a given (b, e) span is used as is)."""
    ids, offs, text = _ids_and_offsets(m, prompt, special_tokens(reference, add_special_tokens))
    if reference is not None and isinstance(subject, str):
        return ids, decoded_span(m, ids, subject), text
    return ids, _span(ids, offs, text, subject), text
