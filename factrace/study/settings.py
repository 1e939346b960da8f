"""The settings of a cross-architecture study, as one object.

:class:`StudySettings` travels from :func:`factrace.study.report.run_report` (or the ``factrace report``
command line) to every stage; it is validated once, hashed into each model's manifest (a rerun with the
same settings resumes, other settings recompute) and written into the report.

Example:
    >>> s = StudySettings(n=20, samples=5)
    >>> s.noise_spec, s.to_dict()["samples"]
    (('s', 3.0), 5)
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True)
class StudySettings:
    """What a study computes (not how it is run: models, dataset, output folder, Dask client, progress bars
    and the sentence encoder are arguments of ``run_report``).

    Fields and defaults:
        n: trace the first ``n`` known facts per model (100, the study's; None: all).
        kinds: restoration kinds (hidden, mlp, attn).
        samples, window: noise samples (10) and restoration window (10) of :func:`factrace.trace`.
        knockout_window: layers per knockout window (None: the preset's, 5 = the paper's text, 6 for
            ``reference="caarm"``, whose code blocks 6); clipped to L-1 for very shallow models.
        noise: ``"s<k>"`` (``"s3"``: 3 x std of the embeddings of ALL the dataset's subjects, per model) or a
            number.
        seed: noise seed (1).
        add_special_tokens: True, False (the study's setting) or ``"auto"`` (False except for Gemma, which
            needs its BOS; see ``stages.special_tokens_for``).
        known_only: keep only facts the model gets right (True); False traces every usable record with the
            model's own greedy answer.
        check_all: check every record for whether the model knows it (False: blocks of 64 until ``n`` are
            found).
        objects: compute objects rates (None: when sentence-transformers is installed; resolved by
            :meth:`resolved`).
        tau: similarity threshold of the objects rate (0.7).
        corpus: reference documents for the objects rate (a tuple of strings; None: the words of each fact's
            prompt, subject and attribute); a file name is read by :meth:`resolved`.
        chunk: facts per saved chunk within a stage (10).
        positions: the rows of each causal trace: None (all tokens, default: the report's six-category
            averages need them) or ``"last_subject"`` (only the last subject token: the per-layer curves,
            peaks and Gini the study reads, at a fraction of the cost; the category averages then show that
            category only). The report records which was run.
        reference: ``None`` (factrace's definitions), ``"rome"`` or ``"caarm"``: every stage runs that code's
            semantics (the ``reference=`` presets of :func:`factrace.known_facts`, :func:`factrace.noise_level`,
            :func:`factrace.trace`, :func:`factrace.sever`, :func:`factrace.knockout`, the objects rate and
            :func:`factrace.gini`; with ``add_special_tokens="auto"`` the preset's tokenization: ROME's special
            tokens everywhere, CAARM's none except for knockout). ROME has no knockout, objects rate or Gini:
            those stages keep factrace's definitions under ``"rome"``. Written into the report.
        known_criterion: ``"first_token"`` or ``"whole_attribute"`` (None: the preset's; see
            :func:`factrace.known_facts`).
    """

    n: int | None = 100
    kinds: tuple = KINDS
    samples: int = 10
    window: int = 10
    knockout_window: int | None = None
    noise: str | float = "s3"
    seed: int = 1
    add_special_tokens: bool | str = "auto"
    known_only: bool = True
    check_all: bool = False
    objects: bool | None = None
    tau: float = 0.7
    corpus: tuple | str | None = None
    chunk: int = 10
    positions: str | None = None
    reference: str | None = None
    known_criterion: str | None = None

    def __post_init__(self):
        from ..methods._reference import check_reference

        kinds = tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        ref = check_reference(self.reference)
        object.__setattr__(self, "reference", ref)
        if self.knockout_window is None:
            object.__setattr__(self, "knockout_window", 6 if ref == "caarm" else 5)
        crit = self.known_criterion or ("whole_attribute" if ref else "first_token")
        if crit not in ("first_token", "whole_attribute"):
            raise ValueError(f"known_criterion must be 'first_token' or 'whole_attribute', got {self.known_criterion!r}")
        object.__setattr__(self, "known_criterion", crit)
        if not kinds or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
        if self.n is not None and int(self.n) < 1:
            raise ValueError(f"n must be >= 1 (or None for all known facts), got {self.n}")
        if self.samples < 1 or self.window < 1 or self.knockout_window < 1 or self.chunk < 1:
            raise ValueError("samples, window, knockout_window and chunk must be >= 1")
        if isinstance(self.noise, str) and not re.fullmatch(r"s\d*(\.\d+)?", self.noise):
            raise ValueError(f"noise must be a number or 's<k>' (e.g. 's3'), got {self.noise!r}")
        if self.positions not in (None, "last_subject"):
            raise ValueError(f"positions must be None or 'last_subject', got {self.positions!r}")
        if self.add_special_tokens not in (True, False, "auto"):
            raise ValueError(f"add_special_tokens must be True, False or 'auto', got {self.add_special_tokens!r}")

    @property
    def noise_spec(self) -> tuple:
        """``("s", k)`` for ``"s<k>"``, ``("abs", level)`` for a number."""
        if isinstance(self.noise, str):  # a bare "s": k = 3 (factrace), k = 1 (the references' parse_noise_rule)
            return ("s", float(self.noise[1:] or (1 if self.reference else 3)))
        return ("abs", float(self.noise))

    def resolved(self, objects_available: bool) -> "StudySettings":
        """These settings with ``objects`` decided (None -> whether sentence-transformers is installed) and a
        corpus file read into a tuple of documents."""
        corpus = self.corpus
        if isinstance(corpus, (str, Path)):
            cp = Path(corpus)
            if not cp.is_file():
                raise ValueError(f"corpus file {cp} does not exist")
            corpus = tuple(line.strip() for line in cp.read_text(encoding="utf-8").splitlines() if line.strip())
        elif corpus is not None:
            corpus = tuple(corpus)
        objects = objects_available if self.objects is None else bool(self.objects)
        return replace(self, objects=objects, corpus=corpus)

    def to_dict(self) -> dict:
        """Plain values for the manifest key and the report (the corpus as its number of documents)."""
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        if isinstance(self.corpus, tuple):
            d["corpus"] = f"{len(self.corpus)} documents"
        return d
