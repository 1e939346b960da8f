"""The stages of the cross-architecture study, for one model (see ``report.py`` for the whole run):
``known`` (which facts the model knows, and the noise level), ``restoration``, ``severing``, ``knockout``
(with objects rates) and ``gini``. Each stage returns a DataFrame; :func:`run_model` saves each as it
completes (and the finished chunks of a stage under way), so a rerun with the same settings resumes.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .._optional import need
from ..methods._common import _field, _progress
from ..methods._reference import _prepare
from ..methods.knockout import gini, knockout
from ..methods.severing import sever
from ..methods.tracing import noise_level
from .dataset_trace import CATEGORIES, known_facts, trace_dataset
from .settings import StudySettings
from .store import FORMAT_VERSION, _atomic_parquet, _hash, _Store

STAGES = ("known", "restoration", "severing", "knockout", "gini")


def _records(dataset, dataset_path=None):
    """(name, list of records) from a dataset name, a .json/.jsonl file or a list of records/dicts."""
    from .datasets import load_dataset

    if isinstance(dataset, (list, tuple)):
        return "records", list(dataset)
    if hasattr(dataset, "to_dict") and hasattr(dataset, "columns"):
        return "records", dataset.to_dict("records")
    s = str(dataset)
    p = Path(s)
    if (s.endswith(".json") or s.endswith(".jsonl")) and p.is_file():
        text = p.read_text(encoding="utf-8")
        if s.endswith(".jsonl"):
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            recs = json.loads(text)
        if not isinstance(recs, list):
            raise ValueError(f"{p}: expected a JSON list of records with prompt, subject and attribute")
        return p.stem, recs
    return s, load_dataset(s, dataset_path)  # ValueError lists the valid names


def _record_dict(r) -> dict:
    return {"prompt": _field(r, "prompt"), "subject": _field(r, "subject"),
            "attribute": str(_field(r, "attribute", "object", "target") or "").lstrip()}


def _check_inputs(m, records, add_special_tokens, reference=None):
    """Split records into usable ones and (record, reason) for those that cannot be traced."""
    ok, bad = [], []
    for i, r in enumerate(records):
        d = _record_dict(r)
        d["record"] = i
        if not d["prompt"] or not d["subject"] or not d["attribute"]:
            bad.append((d, "record lacks prompt, subject or attribute"))
            continue
        if d["subject"] not in d["prompt"]:
            bad.append((d, f"subject {d['subject']!r} is not in the prompt {d['prompt']!r}"))
            continue
        try:
            _prepare(m, d["prompt"], d["subject"], add_special_tokens, reference)
        except ValueError as e:
            bad.append((d, f"subject tokenizes to nothing: {e}"))
            continue
        if len(m.encode(" " + d["attribute"], add_special_tokens=False)) == 0:
            bad.append((d, "attribute tokenizes to nothing"))
            continue
        ok.append(d)
    return ok, bad


def objects_available() -> bool:
    """Whether sentence-transformers (for objects rates) is installed."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _chunked(store: _Store, stage: str, facts, fn, chunk: int, progress: bool, desc: str):
    """Run ``fn(list of fact dicts) -> DataFrame`` over chunks of facts; each finished chunk is saved
    (atomically) so that an interrupted stage resumes from the last finished chunk."""
    pd = need("pandas", "the report")

    chunks = [facts[i:i + chunk] for i in range(0, len(facts), chunk)]
    parts = []
    for i, c in enumerate(_progress(chunks, len(chunks), progress, desc)):
        p = store.part(stage, i)
        if p.exists():
            try:
                parts.append(pd.read_parquet(p))
                continue
            except Exception:  # a damaged part: redo it
                p.unlink()
        df = fn(c)
        _atomic_parquet(df, p)
        parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else None


# ---------------------------------------------------------------------------------------------
# the stages (each returns a DataFrame); ``special`` is the resolved add_special_tokens of the model


def _stage_known(m, records, special, s: StudySettings, block=64):
    pd = need("pandas", "the report")

    ok, bad = _check_inputs(m, records, special, s.reference)
    rows = [dict(d, status="invalid", reason=why, answer=-1, answer_str="") for d, why in bad]
    kept = 0
    for i in range(0, len(ok), block):
        todo = ok[i:i + block]
        if s.n is not None and kept >= s.n and not s.check_all:  # enough facts: the rest is not checked
            rows += [dict(d, status="unchecked", reason="not checked (n known facts found before it)", answer=-1,
                          answer_str="") for d in todo]
            continue
        if s.known_only:
            known, rejected = known_facts(m, todo, add_special_tokens=special, criterion=s.known_criterion,
                                          reference=s.reference)
        else:  # every usable record, with the model's own greedy answer
            known, rejected = [], []
            for d in todo:
                r = m.run(m.encode(d["prompt"], add_special_tokens=special), logits="last")
                known.append((d, int(np.argmax(r.logits[0]))))
        for d, a in known:
            st = "traced" if (s.n is None or kept < s.n) else "known"
            kept += st == "traced"
            rows.append(dict(d, status=st, reason="", answer=int(a), answer_str=m.decode([a])))
        for d, why in rejected:
            rows.append(dict(d, status="unknown", reason=why, answer=-1, answer_str=""))
    df = pd.DataFrame(rows, columns=["record", "prompt", "subject", "attribute", "status", "reason", "answer",
                                     "answer_str"])
    return df.sort_values("record").reset_index(drop=True)


def _stage_restoration(m, facts, level, special, s: StudySettings, client):
    dt = trace_dataset(m, [{k: f[k] for k in ("prompt", "subject", "attribute")} for f in facts], kinds=s.kinds,
                       window=s.window, samples=s.samples, noise=level, seed=s.seed, known_only=False,
                       add_special_tokens=special, progress=False, client=client, positions=s.positions,
                       reference=s.reference)
    if dt.interrupted:
        raise KeyboardInterrupt
    ids = np.array([f["fact"] for f in facts])
    fr = dt.frame.copy()
    fr["fact"] = ids[fr["fact"].to_numpy()] if len(fr) else fr["fact"]
    fa = dt.facts.copy()
    fa["fact"] = ids[fa["fact"].to_numpy()] if len(fa) else fa["fact"]
    return fr.merge(fa[["fact", "low_score", "high_score", "n_tokens", "b", "e"]], on="fact", how="left")


def _stage_severing(m, facts, level, special, s: StudySettings):
    pd = need("pandas", "the report")

    out = []
    for f in facts:
        for frozen in ("mlp", "attn"):
            r = sever(m, f["prompt"], f["subject"], frozen=frozen, samples=s.samples, noise=level, seed=s.seed,
                      target=f["answer"], add_special_tokens=special, reference=s.reference)
            d = r.to_frame()
            d.insert(0, "fact", f["fact"])
            d["low_score"], d["high_score"] = r.low_score, r.high_score
            out.append(d)
    return pd.concat(out, ignore_index=True)


def _references(f, corpus, top_n=3, reference=None, m=None):
    from . import objects as O

    kw = dict(reference=reference, model=m) if reference == "caarm" else {}
    if corpus:
        refs = O.references_from_corpus(f["subject"], list(corpus), top_n=top_n, **kw)
        if refs:
            return refs
    return O.reference_words([f["prompt"], f["subject"], f["attribute"]], **kw)


def _stage_knockout(m, facts, special, s: StudySettings, encoder):
    pd = need("pandas", "the report")

    from . import objects as O

    out = []
    w = min(s.knockout_window, max(1, m.config.n_layers - 1))
    ref = s.reference if s.reference == "caarm" else None  # ROME has no knockout / objects rate
    for f in facts:
        refs = _references(f, s.corpus, reference=ref, m=m) if s.objects else None

        def rate(ids):
            c = O.candidates_from_tokens([m.decode([int(i)]) for i in ids], reference=ref)
            r = O.objects_rate(c, refs, tau=s.tau, encoder=encoder, reference=ref)
            return np.nan if r == -1 else r  # CAARM's "no data" (-1), left out of its averages

        for kind in ("mlp", "attn"):
            k = knockout(m, f["prompt"], f["subject"], kind=kind, window=w, target=f["answer"],
                         add_special_tokens=special, reference=ref)
            d = k.to_frame()
            d.insert(0, "fact", f["fact"])
            d["objects_rate"] = [rate(ids) for ids in k.subject_topk] if s.objects else np.nan
            d["clean_objects_rate"] = rate(k.clean_topk) if s.objects else np.nan
            out.append(d)
    return pd.concat(out, ignore_index=True)


def _last_subject(rest):
    """Per-fact last-subject-token effect vectors: DataFrame (fact, kind, layer, effect)."""
    g = rest[rest.category == CATEGORIES[2]]
    return g[["fact", "kind", "layer", "effect"]]


def _stage_gini(rest, kinds, reference=None):
    pd = need("pandas", "the report")

    rows = []
    ls = _last_subject(rest)
    for kind in kinds:
        g = ls[ls.kind == kind]
        if not len(g):
            rows.append(dict(kind=kind, gini=np.nan, gini_fact_mean=np.nan, gini_fact_band=np.nan, n=0))
            continue
        mean = g.groupby("layer").effect.mean().sort_index().to_numpy()
        per = [gini(x.sort_values("layer").effect.to_numpy(), reference) for _, x in g.groupby("fact")]
        rows.append(dict(kind=kind, gini=gini(mean, reference), gini_fact_mean=float(np.mean(per)),
                         gini_fact_band=float(1.96 * np.std(per) / np.sqrt(len(per))), n=len(per)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# one model


def special_tokens_for(m, setting, reference=None, where: str = "trace") -> bool:
    """Resolve ``add_special_tokens``: a bool is used as given; ``"auto"`` follows the study (no special
    tokens) except for Gemma, which is only usable with its BOS token (without it gemma3-270m knows none
    of the first 50 known_1000 facts; with it, 24 of the first 60). Under a preset ``"auto"`` is that code's
    tokenization: ROME the tokenizer's special tokens everywhere, CAARM none except for knockout
    (``where="knockout"``)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"add_special_tokens must be True, False or 'auto', got {setting!r}")
    if reference == "rome":
        return True
    if reference == "caarm":
        return where == "knockout"
    return m.config.arch == "Gemma3ForCausalLM"


def _noise(m, records, s: StudySettings) -> float:
    """The study's noise level for this model: a number, or k x the std of ALL the dataset's subjects'
    embeddings (NaN when no subject produces a token; such records are reported as invalid)."""
    kind, k = s.noise_spec
    if kind == "abs":
        return k
    try:
        return noise_level(m, [x for x in (_field(r, "subject") for r in records) if x], k, reference=s.reference)
    except ValueError:
        return float("nan")


def run_model(spec, label, records, dataset_name, s: StudySettings, *, encoder, client, progress, data_dir,
              result) -> dict:
    """Every stage for one model (``spec``: a loaded Model or anything :func:`factrace.load` takes), each
    loaded from ``data_dir/label`` when done before with the same settings and inputs, else computed and
    saved. Returns {"model", "label", "L", "source", "known", "noise", "facts", and each stage's frame}."""
    import factrace

    m = spec if isinstance(spec, factrace.Model) else factrace.load(spec)
    special = special_tokens_for(m, s.add_special_tokens, s.reference)
    special_ko = special_tokens_for(m, s.add_special_tokens, s.reference, "knockout")
    result.special[label] = special
    source = str(getattr(m, "source", None) or getattr(m, "name", label))
    key = _hash(dict(source=source, dataset=dataset_name, records=_hash([_record_dict(r) for r in records]),
                     settings=s.to_dict(), corpus=_hash(s.corpus) if s.corpus else None, special=special if special_ko == special else [special, special_ko],
                     v=FORMAT_VERSION))
    store = _Store(data_dir / label, key)
    frames = {"model": m, "label": label, "L": m.config.n_layers, "source": source}
    secs = result.seconds.setdefault(label, {})

    def stage(name, compute):
        if store.done(name):
            try:
                df = store.load(name)
                result.reused.append((label, name))
                secs[name] = store.seconds(name)
                return df
            except Exception:
                store.invalidate(name)
        store.invalidate(name)
        t0 = time.perf_counter()
        df, meta = compute()
        dt = time.perf_counter() - t0
        store.finish(name, df, dt, meta)
        result.computed.append((label, name))
        secs[name] = dt
        return df

    def chunked(name, fn):
        return stage(name, lambda: (_chunked(store, name, facts, fn, s.chunk, progress, f"{label}: {name}"), {}))

    known = stage("known", lambda: (_stage_known(m, records, special, s), {"noise": _noise(m, records, s)}))
    level = store.meta("known").get("noise", float("nan"))
    frames["known"], frames["noise"] = known, level
    facts = known[known.status == "traced"].rename(columns={"record": "fact"}).to_dict("records")
    frames["facts"] = facts
    if not facts:
        return frames
    frames["restoration"] = chunked("restoration", lambda c: _stage_restoration(m, c, level, special, s, client))
    frames["severing"] = chunked("severing", lambda c: _stage_severing(m, c, level, special, s))
    frames["knockout"] = chunked("knockout", lambda c: _stage_knockout(m, c, special_ko, s, encoder))
    frames["gini"] = stage("gini", lambda: (_stage_gini(frames["restoration"], s.kinds, s.reference), {}))
    return frames
