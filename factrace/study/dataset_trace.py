"""Causal tracing at dataset scale: the known-fact filter, ROME's six token categories and averaged
effects (AIE, ATE), the cross-architecture study's last-subject-token effects, and the spread of facts
over a Dask cluster (``study.dask``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._optional import need
from ..methods._common import _field, _progress, result_html
from ..methods._reference import check_reference, special_tokens
from ..methods.tracing import KINDS, _noise_value, trace_all
from ..model import Model


CATEGORIES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
              "further tokens", "last token")


CRITERIA = ("first_token", "whole_attribute")


def known_facts(m: Model, records, add_special_tokens: bool | None = None, batch: int = 32, criterion=None,
                reference=None):
    """Split ``records`` (dicts or dataset records with ``prompt``, ``subject`` and ``attribute`` /
    ``object`` / ``target``) into the facts the model gets right and the rest.

    ``criterion``:
        ``"first_token"`` (factrace's default): the greedy next token is the first token of
            ``" " + attribute``. Default because it does not depend on how a tokenizer happens to split the
            attribute: under ``"whole_attribute"`` a model whose vocabulary lacks ``" midfielder"`` as one token
            can never know that fact, which confounds comparisons across architectures with different
            vocabularies, while every method traces the probability of one (the first) answer token anyway.
        ``"whole_attribute"`` (ROME's and CAARM's code: ``calculate_hidden_flow(expect=attribute)``): the greedy
            next token, decoded and stripped, equals the whole attribute, so only single-token attributes can
            be known.
    ``reference``: ``"rome"`` or ``"caarm"`` set ``criterion="whole_attribute"`` and their tokenization (ROME:
    the tokenizer's special tokens; CAARM: none) and compare with the attribute as stored (unstripped).
    ``add_special_tokens`` default (None): True, or the preset's. Explicit arguments override the preset.

    Returns (known: list of (record, answer_id), rejected: list of (record, reason))."""
    reference = check_reference(reference)
    criterion = ("whole_attribute" if reference else "first_token") if criterion is None else criterion
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    special = special_tokens(reference, add_special_tokens)
    known, rejected, todo = [], [], []
    for r in records:
        prompt, subj = _field(r, "prompt"), _field(r, "subject")
        obj = _field(r, "attribute", "object", "target")
        if not prompt or not subj or obj is None:
            rejected.append((r, "record lacks prompt, subject or attribute"))
            continue
        if subj not in prompt:
            rejected.append((r, f"subject {subj!r} is not in the prompt"))
            continue
        if criterion == "whole_attribute":
            want = str(obj) if reference else str(obj).strip()
        else:
            target = obj if str(obj).startswith(" ") else " " + str(obj)
            t_ids = m.encode(target, add_special_tokens=False)
            if len(t_ids) == 0:
                rejected.append((r, "attribute tokenizes to nothing"))
                continue
            want = int(t_ids[0])
        todo.append((r, m.encode(prompt, add_special_tokens=special), want))
    for i in range(0, len(todo), batch):
        chunk = todo[i:i + batch]
        rs = m.run([c[1] for c in chunk], logits="last")
        for (r, _, want), res in zip(chunk, rs):
            got = int(np.argmax(res.logits[0]))
            if criterion == "whole_attribute":
                if m.decode([got]).strip() == want:
                    known.append((r, got))
                else:
                    rejected.append((r, f"model predicts {m.decode([got])!r}, not the whole attribute {want!r}"))
            elif got == want:
                known.append((r, want))
            else:
                rejected.append((r, f"model predicts {m.decode([got])!r}, not {m.decode([want])!r}"))
    return known, rejected


def _categories(T, b, e):
    """{category: list of rows} of ROME's six token categories for a prompt of T tokens, subject [b, e)."""
    cats = {CATEGORIES[0]: [b], CATEGORIES[1]: list(range(b + 1, e - 1)), CATEGORIES[2]: [e - 1],
            CATEGORIES[3]: [e] if e < T else [], CATEGORIES[4]: list(range(e + 1, T - 1)), CATEGORIES[5]: [T - 1]}
    return cats


@dataclass
class DatasetTrace:
    """Traces of many facts. ``frame``: tidy rows (fact, kind, position, layer, category, score, effect,
    low_score, high_score); ``facts``: one row per traced fact; ``rejected``: facts not traced and why;
    ``interrupted``: True if stopped early (Ctrl-C) — the rows done are kept."""

    frame: object
    facts: object
    rejected: list
    kinds: tuple
    interrupted: bool = False

    def _repr_html_(self):
        return result_html(self, title=f"DatasetTrace: {len(self.facts)} facts, kinds {', '.join(self.kinds)}"
                                       f"{' (interrupted)' if self.interrupted else ''}")

    def averages(self):
        """ROME's averaged figure data: per kind, category and layer the mean score, AIE (mean score -
        mean low_score over prompts), error band (1.96 std / sqrt(n)) and n. Pooled categories weight
        prompts by token count."""
        pd = need("pandas", "DatasetTrace.averages()")

        f = self.frame
        rows = []
        for kind in self.kinds:
            fk = f[f.kind == kind]
            low = self.facts.low_score.mean()
            for (cat, layer), g in fk.groupby(["category", "layer"], sort=False):
                n = len(g)
                rows.append(dict(kind=kind, category=cat, layer=layer, n=n, score=g.score.mean(),
                                 aie=g.score.mean() - low, band=1.96 * g.score.std(ddof=0) / np.sqrt(n)))
        out = pd.DataFrame(rows)
        if len(out):
            out["category"] = pd.Categorical(out.category, CATEGORIES, ordered=True)
            out = out.sort_values(["kind", "category", "layer"]).reset_index(drop=True)
        return out

    def ate(self) -> float:
        """Average total effect: mean(high_score) - mean(low_score)."""
        return float(self.facts.high_score.mean() - self.facts.low_score.mean())

    def last_subject_effects(self):
        """Per kind and layer: mean over facts of (score at the last subject token - low_score) with a
        1.96 std / sqrt(n) band (the cross-architecture study's restoration effect per layer)."""
        f = self.frame
        g = f[f.category == CATEGORIES[2]].groupby(["kind", "layer"]).effect
        out = g.agg(["mean", "std", "count"]).reset_index()
        out["band"] = 1.96 * out["std"].fillna(0) / np.sqrt(out["count"])
        return out.rename(columns={"mean": "effect", "count": "n"}).drop(columns="std")

    def plot(self, kind="hidden"):
        """ROME's averaged line plot: AIE per layer for each of the six categories, with error bands."""
        plt = need("matplotlib.pyplot", "DatasetTrace.plot()")

        av = self.averages()
        av = av[av.kind == kind]
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        for cat in CATEGORIES:
            g = av[av.category == cat]
            if len(g):
                ax.plot(g.layer, g.aie, label=cat)
                ax.fill_between(g.layer, g.aie - g.band, g.aie + g.band, alpha=0.15)
        ax.set_xlabel("layer")
        ax.set_ylabel("average indirect effect")
        ax.set_title(f"{kind}: ATE {self.ate():.3f} over {len(self.facts)} facts", fontsize=9)
        ax.legend(fontsize=7)
        plt.close(fig)
        return fig


def _trace_rows(m, fid, rec, answer, kinds, window, samples, noise, seed, add_special_tokens, reference=None,
                positions=None):
    prompt, subj = _field(rec, "prompt"), _field(rec, "subject")
    res = trace_all(m, prompt, subj, kinds=kinds, window=window, samples=samples, noise=noise, seed=seed,
                    target=answer, add_special_tokens=add_special_tokens, reference=reference, positions=positions)
    rows = []
    first = next(iter(res.values()))
    T = len(first.tokens)
    b, e = first.subject_range
    cats = _categories(T, b, e)
    for kind, r in res.items():
        for cat, positions in cats.items():
            for t in positions:
                if np.isnan(r.scores[t]).all():
                    continue  # a row not traced (``positions``)
                for l in range(r.scores.shape[1]):
                    rows.append((fid, kind, t, l, cat, r.scores[t, l], r.scores[t, l] - r.low_score))
    fact = dict(fact=fid, prompt=prompt, subject=subj, answer=first.answer_str, n_tokens=T, b=b, e=e,
                low_score=first.low_score, high_score=first.high_score)
    return rows, fact


def trace_dataset(m: Model, records, kinds=KINDS, window: int = 10, samples: int = 10, noise="s3", seed: int = 1,
                  n: int | None = None, known_only: bool = True, add_special_tokens: bool | None = None,
                  progress: bool = True, client=None, chunk: int = 4, criterion=None, reference=None,
                  positions=None) -> DatasetTrace:
    """Trace many facts: keep those the model gets right, trace each kind, and tabulate.

    Args:
        records: dicts or dataset records with ``prompt``, ``subject`` and ``attribute`` (or ``object``).
        kinds: subset of ("hidden", "mlp", "attn"); window, samples, seed: as :func:`trace`.
        noise: number or ``"s<k>"`` (or another of :func:`trace`'s noise rules); for ``"s<k>"`` the std is
            measured over ALL given records' subjects (as ROME's ``main()``, which takes them from its facts).
        n: trace at most the first ``n`` known facts (the study uses 100; CAARM's first 100 known facts; ROME's
            averaged figure uses the known facts among known_id < 225: pass ``records[:225]``).
        known_only: keep only known facts (:func:`known_facts` with ``criterion``; default True).
        add_special_tokens: default (None): True, or the preset's (CAARM: False).
        progress: show a progress bar (tqdm if installed).
        positions: the rows traced per fact (:func:`factrace.trace`): None (all: ROME's six category
            averages need them) or ``"last_subject"`` (the cross-architecture study's one row, e - 1;
            ``frame`` then holds only the last-subject-token category).
        client: a ``dask.distributed.Client`` (or anything with ``submit``/``gather``): facts are shared
            among its workers, each of which loads the model (from ``m.source``) once; results equal the
            local run's.
        criterion: the known-fact criterion (see :func:`known_facts`).
        reference: ``None``, ``"rome"`` or ``"caarm"``: the known-fact filter (whole attribute), the noise
            level, the spans and the tokenization as those presets of :func:`known_facts`, :func:`noise_level`
            and :func:`trace`. Averages (ROME's six categories, AIE, ATE) are the same in every preset.

    Ctrl-C stops the run and returns what is done (``interrupted=True``).

    Example:
        >>> from factrace.datasets import load_dataset                                # doctest: +SKIP
        >>> dt = factrace.trace_dataset(m, load_dataset("known_1000"), n=100)        # doctest: +SKIP
        >>> dt.averages().head(); dt.ate()                                           # doctest: +SKIP
        >>> dt = factrace.trace_dataset(m, load_dataset("known_1000"), n=100, reference="caarm")  # doctest: +SKIP
    """
    pd = need("pandas", "trace_dataset")

    records = list(records)
    reference = check_reference(reference)
    special = special_tokens(reference, add_special_tokens)
    if known_only:
        known, rejected = known_facts(m, records, add_special_tokens=special, criterion=criterion, reference=reference)
    else:
        known, rejected = [(r, None) for r in records], []
    if n is not None:
        known = known[:n]
    level = _noise_value(m, noise, [_field(r, "subject") for r in records if _field(r, "subject")], reference)
    kw = dict(kinds=tuple(kinds), window=window, samples=samples, noise=level, seed=seed,
              add_special_tokens=special, reference=reference, positions=positions)
    rows, facts, interrupted = [], [], False
    items = [(i, r, a) for i, (r, a) in enumerate(known)]
    try:
        if client is not None:
            if not m.source:
                raise ValueError("a Dask run needs a model loaded from a path or name (m.source)")
            from .dask import _worker_chunk

            futs = [client.submit(_worker_chunk, m.source, items[i:i + chunk], kw, pure=False)
                    for i in range(0, len(items), chunk)]
            for part in _progress(client.gather(futs), len(futs), progress, "trace (dask)"):
                for r, f in part:
                    rows += r
                    facts.append(f)
        else:
            for fid, rec, answer in _progress(items, len(items), progress, "trace"):
                try:
                    r, f = _trace_rows(m, fid, rec, answer, **kw)
                except ValueError as e:  # a subject that covers no token, etc.
                    rejected.append((rec, str(e)))
                    continue
                rows += r
                facts.append(f)
    except KeyboardInterrupt:
        interrupted = True
    frame = pd.DataFrame(rows, columns=["fact", "kind", "position", "layer", "category", "score", "effect"])
    facts_df = pd.DataFrame(facts, columns=["fact", "prompt", "subject", "answer", "n_tokens", "b", "e", "low_score",
                                            "high_score"])
    return DatasetTrace(frame=frame, facts=facts_df, rejected=rejected, kinds=tuple(kinds), interrupted=interrupted)

