"""The report's tables, figures and documents (Markdown and a self-contained HTML page) from the
per-model stage results.
"""
from __future__ import annotations

import html as _html
from pathlib import Path

import numpy as np

from .._optional import need
from .dataset_trace import DatasetTrace
from .stages import _last_subject
from .store import _atomic_text


def _band(x):
    x = np.asarray(x, float)
    return float(1.96 * x.std() / np.sqrt(len(x))) if len(x) else np.nan


def _mean_band(groups, columns):
    """Per group of ``groups`` (a pandas GroupBy): for each (column, band_name) of ``columns`` the mean
    of the column and, when band_name is given, its 95% band under that name; then n, the group size."""
    pd = need("pandas", "the report")

    out = {}
    for col, band in columns:
        out[col] = groups[col].mean()
        if band:
            out[band] = groups[col].agg(_band)
    out["n"] = groups.size()
    return pd.DataFrame(out).reset_index()


def _tables(per_model, kinds):
    pd = need("pandas", "the report")

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
            dt = DatasetTrace(frame=rest, facts=per_fact.reset_index(), rejected=[], kinds=tuple(kinds))
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


def _line_band(ax, x, y, band, color, label, fmt="o-"):
    """A mean curve with its 95% band shaded."""
    ax.plot(x, y, fmt, ms=3, color=color, label=label)
    ax.fill_between(x, y - band, y + band, color=color, alpha=0.2)


def _figures(tables, fig_dir: Path, kinds, models):
    """Every figure of the report written to ``fig_dir``; returns [(file name, caption)]."""
    matplotlib = need("matplotlib", "the report's figures")

    matplotlib.use("Agg", force=False)
    plt = need("matplotlib.pyplot", "the report's figures")

    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = []
    colors = {lab: f"C{i}" for i, lab in enumerate(models)}
    for draw in (_fig_restoration, _fig_severing, _fig_knockout, _fig_gini):
        made = draw(plt, tables, kinds, models, colors)
        if made is None:
            continue
        fig, name, caption = made
        fig.tight_layout()
        fig.savefig(fig_dir / name, bbox_inches="tight", dpi=100)
        plt.close(fig)
        figs.append((name, caption))
    return figs


def _fig_restoration(plt, tables, kinds, models, colors):
    ls = tables["restoration_last_subject"]
    if not len(ls):
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for lab in models:
            g = ls[(ls.model == lab) & (ls.kind == kind)].sort_values("layer")
            if len(g):
                _line_band(ax, g.depth, g.effect, g.band, colors[lab], lab)
        ax.set_title(f"restoring {kind} at the last subject token", fontsize=9)
        ax.set_xlabel("relative layer depth (layer / (L-1))")
        ax.axhline(0, color="0.7", lw=0.5)
    axes[0][0].set_ylabel("indirect effect (p - p corrupted)")
    axes[0][0].legend(fontsize=8)
    return fig, "restoration.png", ("Restoration effect at the last subject token per layer (mean over facts, "
                                    "band 1.96 std/sqrt(n)); x: relative depth so models of different depth align.")


def _fig_severing(plt, tables, kinds, models, colors):
    sv = tables["severing"]
    if not len(sv):
        return None
    ms = [lab for lab in models if (sv.model == lab).any()]
    fig, axes = plt.subplots(1, len(ms), figsize=(4.2 * len(ms), 3.4), squeeze=False)
    for ax, lab in zip(axes[0], ms):
        g = sv[sv.model == lab]
        base = g[g.frozen == "mlp"].sort_values("layer")
        _line_band(ax, base.layer, base.unsevered_effect, base.unsevered_band, "C4", "hidden (nothing frozen)",
                   fmt="-")
        for frozen, c in (("mlp", "C2"), ("attn", "C3")):
            h = g[g.frozen == frozen].sort_values("layer")
            _line_band(ax, h.layer, h.effect, h.band, c, f"{frozen} frozen")
        ax.set_title(f"{lab}: severing at the last subject token", fontsize=9)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("indirect effect")
    axes[0][0].legend(fontsize=8)
    return fig, "severing.png", ("Severing: hidden-state restoration at the last subject token with the MLP or "
                                 "attention outputs there frozen at their corrupted values.")


def _fig_knockout(plt, tables, kinds, models, colors):
    ko = tables["knockout"]
    if not len(ko):
        return None
    has_obj = ko.objects_rate.notna().any()
    rows = 2 if has_obj else 1
    fig, axes = plt.subplots(rows, 2, figsize=(9, 3.3 * rows), squeeze=False)
    for j, kind in enumerate(("mlp", "attn")):
        for lab in models:
            g = ko[(ko.model == lab) & (ko.kind == kind)].sort_values("start")
            if not len(g):
                continue
            ax = axes[0][j]
            _line_band(ax, g.depth, g.relative_change, g.relative_change_band, colors[lab], lab)
            ax.set_title(f"{kind} knockout: answer probability", fontsize=9)
            ax.set_ylabel("relative change (%)")
            if has_obj:
                ax = axes[1][j]
                _line_band(ax, g.depth, g.objects_rate, g.objects_rate_band, colors[lab], lab)
                ax.axhline(g.clean_objects_rate.iloc[0], color=colors[lab], ls=":", lw=1)
                ax.set_title(f"{kind} knockout: objects rate (dotted: no knockout)", fontsize=9)
                ax.set_ylabel("objects rate (%)")
    for ax in axes[-1]:
        ax.set_xlabel("window start (relative depth)")
    axes[0][0].legend(fontsize=8)
    return fig, "knockout.png", ("Module knockout per window start: relative change of the answer probability"
                                 + (" and the objects rate at the last subject token" if has_obj else "")
                                 + " (mean over facts, band 1.96 std/sqrt(n)).")


def _fig_gini(plt, tables, kinds, models, colors):
    gi = tables["gini"]
    if not len(gi):
        return None
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
    return fig, "gini.png", ("Gini coefficient of the per-layer restoration effect at the last subject token: "
                             "bars mean over facts (with band), black marks: Gini of the mean effect.")


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
         "checked for whether the model knows them; known: the model's greedy answer passes the known-fact filter (settings: known_criterion); traced: the first n known facts; ATE = mean clean p - mean corrupted p; seconds: compute time."),
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

