"""The additive motif of factual recall, tested by ablation (Chughtai, Cooney & Nanda 2024; METHODS.md
sections 3 and 9).

:func:`mechanism_ablation` classifies heads with direct logit attribution over a dataset (subject,
relation and mixed heads: :meth:`factrace.DLAResult.classify` applied to the dataset's mean DLA), then
ablates each group at END (the last position) -- subject heads, relation heads, mixed heads, the MLPs --
alone, all but one, and all together, and reports over the dataset the correct attribute's logit
difference (against the mean of the relation's other candidate attributes) and accuracy, whether the
drops add up (the sum of the single drops vs the joint drop) and whether the groups are independent (each
group's DLA with every other group ablated vs in the clean run).

The engine: an ablation at END changes nothing at earlier positions, so each prompt's first T-1 positions
run once (their keys and values cached) and every condition is one row per prompt through all layers, all
prompts in one C call.

Example:
    >>> recs = factrace.datasets.load_dataset("facts")                               # doctest: +SKIP
    >>> res = factrace.mechanism_ablation(m, recs)                                     # doctest: +SKIP
    >>> res.table()          # one row per condition                                   # doctest: +SKIP
    >>> res.additivity(), res.independence(); res.plot()                               # doctest: +SKIP
"""
from __future__ import annotations

import html as _html
from dataclasses import dataclass, field

import numpy as np

from .. import interventions as iv
from ._common import _pd, _plt, _record_fields, _token_id, resolve_target

HEAD_GROUPS = ("subject_heads", "relation_heads", "mixed_heads")
GROUPS = HEAD_GROUPS + ("mlps",)


@dataclass
class MechanismAblation:
    """The result of :func:`mechanism_ablation`.

    ``frame``: one row per condition (``condition``, ``kind`` in none / single / all_but_one / all,
    ``ablated`` groups, ``logit_diff`` mean over prompts, ``drop`` = clean - ablated logit difference (mean
    of the per-prompt drops), ``accuracy`` (the target is the top-1 token), ``accuracy_drop``,
    ``dla_<group>`` the mean DLA of each group in that condition). ``per_prompt``: the same per prompt
    and condition. ``groups``: {group: components} ((layer, head) pairs; the MLP group a list of layers).
    ``head_classes`` (L, H) from the dataset's mean DLA; ``dla_mean`` (L, H) that mean; ``ablation``
    ("mean" or "zero"); ``prompts`` the prompts used.
    """

    frame: object
    per_prompt: object
    groups: dict
    head_classes: np.ndarray
    dla_mean: np.ndarray
    ablation: str
    prompts: list
    extra: dict = field(default_factory=dict)

    def _row(self, cond):
        f = self.frame
        return f[f["condition"] == cond].iloc[0]

    def table(self):
        """The per-condition frame with the main columns, rounded (a copy)."""
        cols = ["condition", "kind", "n_components", "logit_diff", "drop", "accuracy", "accuracy_drop"] + \
            [f"dla_{g}" for g in self.groups]
        return self.frame[cols].round(4)

    def additivity(self) -> dict:
        """``sum_single_drops`` (the drops of each group ablated alone, summed), ``joint_drop`` (all groups
        together), their ``ratio`` (joint / sum; 1 = additive), and per group its single ``drop`` next to
        ``dla_lost`` = its clean DLA minus its DLA when ablated (additive mechanisms: drop ~ dla_lost)."""
        singles = {g: float(self._row(f"ablate {g}")["drop"]) for g in self.groups}
        joint = float(self._row("ablate all")["drop"])
        s = sum(singles.values())
        clean = self._row("clean")
        per = {g: {"drop": singles[g],
                   "dla_lost": float(clean[f"dla_{g}"] - self._row(f"ablate {g}")[f"dla_{g}"])} for g in self.groups}
        return {"sum_single_drops": s, "joint_drop": joint, "ratio": joint / s if abs(s) > 1e-12 else float("nan"),
                "groups": per}

    def independence(self):
        """One row per group: ``dla_clean`` (its mean DLA in the clean runs), ``dla_others_ablated`` (with
        every other group ablated), ``ratio`` (their quotient; 1 = independent of the other groups) and
        ``others_change`` (the change of the other groups' summed DLA when this group alone is ablated)."""
        pd = _pd()
        clean = self._row("clean")
        rows = []
        for g in self.groups:
            ab = self._row(f"ablate all but {g}")
            single = self._row(f"ablate {g}")
            others = [o for o in self.groups if o != g]
            oc = sum(float(single[f"dla_{o}"] - clean[f"dla_{o}"]) for o in others)
            rows.append({"group": g, "n_components": len(self.groups[g]), "dla_clean": float(clean[f"dla_{g}"]),
                         "dla_others_ablated": float(ab[f"dla_{g}"]),
                         "ratio": float(ab[f"dla_{g}"] / clean[f"dla_{g}"]) if abs(clean[f"dla_{g}"]) > 1e-12
                         else float("nan"),
                         "others_change": oc})
        return pd.DataFrame(rows)

    def plot(self, fig=None):
        """Two panels: the logit-difference drop of each condition (single groups, all but one, all; the sum
        of the single drops dashed) and each group's DLA clean vs with the other groups ablated. Returns
        a matplotlib Figure."""
        Figure = _plt()
        fig = fig or Figure(figsize=(10, 3.8), layout="constrained")
        a1, a2 = fig.subplots(1, 2)
        f = self.frame[self.frame["kind"] != "none"]
        colors = {"single": "#1f77b4", "all_but_one": "#ff7f0e", "all": "#2ca02c"}
        x = np.arange(len(f))
        a1.bar(x, f["drop"], color=[colors[k] for k in f["kind"]])
        a1.axhline(self.additivity()["sum_single_drops"], color="k", ls="--", lw=1, label="sum of single drops")
        a1.set_xticks(x)
        a1.set_xticklabels([c.replace("ablate ", "") for c in f["condition"]], rotation=35, ha="right", fontsize=7)
        a1.set_ylabel("drop in logit difference")
        a1.set_title(f"{self.ablation} ablation at END ({len(self.prompts)} prompts)", fontsize=9)
        a1.legend(fontsize=7)
        ind = self.independence()
        w = 0.38
        xi = np.arange(len(ind))
        a2.bar(xi - w / 2, ind["dla_clean"], w, label="clean")
        a2.bar(xi + w / 2, ind["dla_others_ablated"], w, label="other groups ablated")
        a2.set_xticks(xi)
        a2.set_xticklabels(ind["group"], fontsize=8)
        a2.set_ylabel("group DLA (logit diff)")
        a2.set_title("independence", fontsize=9)
        a2.axhline(0, color="k", lw=0.5)
        a2.legend(fontsize=7)
        return fig

    def _repr_html_(self):
        add = self.additivity()
        rows = "".join(f"<tr><td>{_html.escape(str(r.condition))}</td><td>{r.logit_diff:.3f}</td><td>{r.drop:.3f}</td>"
                       f"<td>{r.accuracy:.2f}</td></tr>" for r in self.frame.itertuples())
        groups = ", ".join(f"{g}: {len(c)}" for g, c in self.groups.items())
        return (f"<div><b>MechanismAblation</b> ({self.ablation} ablation at END, {len(self.prompts)} prompts; "
                f"{_html.escape(groups)})<table><tr><th>condition</th><th>logit diff</th><th>drop</th>"
                f"<th>accuracy</th></tr>{rows}</table><small>sum of single drops {add['sum_single_drops']:.3f}, "
                f"joint drop {add['joint_drop']:.3f}</small></div>")


def _targets(m, items, records):
    """Per prompt: (target id, contrast ids or [])."""
    from ..study.datasets import facts_candidates

    cands_by_rel = None
    out = []
    for (p, subj, tgt, rel, obj), rec in zip(items, records):
        extra = getattr(rec, "extra", None) or (rec.get("extra") if isinstance(rec, dict) else None) or {}
        cands = extra.get("candidates")
        if cands is None and rel is not None:
            if cands_by_rel is None:
                cands_by_rel = facts_candidates()
            cands = cands_by_rel.get(rel)
        if tgt is None:
            raise ValueError(f"record {p!r} has no target / object")
        a = resolve_target(m, tgt)[0][0]
        # the other attributes' first tokens (those equal to the target's are dropped)
        neg = sorted({_token_id(m, " " + o) for o in (cands or []) if obj is None or o != str(obj).strip()} - {a})
        out.append((a, neg))
    return out


def _clean_pass(m, items, ids, targets, batches, classify):
    """Per batch one full run of the prompts: its keys and values (the prefix cache of the one-row runs)
    and, with ``classify``, each prompt's DLA (heads (L, H) and their split by source group (L, H, 4))."""
    from .dla import _DLA_CAPTURE, _dla_from_run

    caches, heads, groups = [], [], []
    for b in batches:
        runs = m.run([ids[i] for i in b], capture=(_DLA_CAPTURE + ["k_cache"]) if classify else ["k_cache", "v_cache"],
                     logits="last" if classify else None)
        runs = runs if isinstance(runs, list) else [runs]
        rows = np.concatenate([[0], np.cumsum([len(ids[i]) for i in b])[:-1]]).astype(np.int64)
        k = np.ascontiguousarray(np.concatenate([r.k_cache for r in runs], 1))
        v = np.ascontiguousarray(np.concatenate([r.v_cache for r in runs], 1))
        caches.append((k, v, rows))
        if classify:
            for i, r in zip(b, runs):
                p, subj, *_ = items[i]
                a, neg = targets[i]
                res = _dla_from_run(m, r, ids[i], (a, neg) if neg else a, subj, None,
                                    prompt_text=p if isinstance(p, str) else None)
                heads.append(res.heads)
                groups.append(res.head_groups)
    return caches, heads, groups


def mechanism_ablation(m, records, groups=None, ablation: str = "mean", min_frac: float = 0.05, share: float = 0.6,
                       mixed_share: float = 0.25, batch_size: int = 64) -> MechanismAblation:
    """Ablate the four mechanisms of factual recall at END, alone, all but one and all together.

    Args:
        m: a :class:`factrace.Model` (no final logit softcapping: DLA must be linear).
        records: :class:`factrace.datasets.FactRecord` objects (e.g. ``load_dataset("facts")``), dicts or
            ``(prompt, subject, target)`` tuples. The metric is the logit difference between the target's
            first token and the mean of the other candidate attributes of the record's relation
            (``extra["candidates"]``, or the facts set's candidates), or the target's logit when there are
            none.
        groups: None (default: classify heads with DLA over ``records``: subject / relation / mixed heads of
            :meth:`factrace.DLAResult.classify` applied to the dataset's mean DLA, thresholds ``min_frac``,
            ``share``, ``mixed_share``; plus every MLP) or a dict {name: [(layer, head), ...]} for head
            groups and {name: [layer, ...]} under a name starting with "mlp" for MLP groups.
        ablation: ``"mean"`` (default: each head's z and each MLP's output at END set to its mean over the
            records' END positions in the clean runs) or ``"zero"``.
        min_frac, share, mixed_share: the classification thresholds (defaults of ``DLAResult.classify``).
        batch_size: prompts per C call.

    Returns: :class:`MechanismAblation` with ``frame`` / ``table()`` (one row per condition: clean, each
    group alone, all but each group, all), ``additivity()``, ``independence()``, ``plot()``.

    Example:
        >>> res = factrace.mechanism_ablation(m, factrace.datasets.load_dataset("facts"))   # doctest: +SKIP
        >>> res.table()[["condition", "logit_diff", "drop", "accuracy"]]                     # doctest: +SKIP
    """
    from .dla import _check_linear

    _check_linear(m)
    if ablation not in ("mean", "zero"):
        raise ValueError("ablation must be 'mean' or 'zero'")
    pd = _pd()
    c = m.config
    L, H, dh = c.n_layers, c.n_heads, c.d_head
    records = list(records)
    items = [_record_fields(r) for r in records]
    if not items:
        raise ValueError("no records")
    prompts = [p for p, *_ in items]
    ids = [m.encode(p) if isinstance(p, str) else np.asarray(p, np.int32) for p in prompts]
    tg = _targets(m, items, records)
    batches = [list(range(i, min(i + batch_size, len(ids)))) for i in range(0, len(ids), batch_size)]
    prefix, heads, hgroups = _clean_pass(m, items, ids, tg, batches, classify=groups is None)
    if groups is None:
        from .dla import _classify

        dla_mean = np.mean(heads, 0)
        classes = _classify(dla_mean, np.mean(hgroups, 0), min_frac, share, mixed_share)
        groups = {g: [(int(l), int(h)) for l, h in zip(*np.nonzero(classes == g.split("_")[0]))] for g in HEAD_GROUPS}
        groups["mlps"] = list(range(L))
    else:
        classes, dla_mean = np.full((L, H), "", dtype=object), np.full((L, H), np.nan)
        groups = {k: [tuple(int(x) for x in v) if not k.startswith("mlp") else int(v) for v in vs]
                  for k, vs in groups.items()}
        for k, vs in groups.items():
            if not k.startswith("mlp"):
                for l, h in vs:
                    classes[l, h] = k
    names = list(groups)

    # one pass per batch: the first T-1 positions (keys and values), then every condition as one row per prompt
    conds = [("clean", "none", ())] + [(f"ablate {g}", "single", (g,)) for g in names] + \
        [(f"ablate all but {g}", "all_but_one", tuple(o for o in names if o != g)) for g in names] + \
        [("ablate all", "all", tuple(names))]
    per_rows = []
    clean_runs = [_one_row(m, [ids[i] for i in b], pf, []) for b, pf in zip(batches, prefix)]
    # the mean of each head's z and each MLP's output at END over the prompts
    z_all = np.concatenate([r["z"] for r in clean_runs], 1)        # (L, R, H*dh)
    mlp_all = np.concatenate([r["mlp_out"] for r in clean_runs], 1)  # (L, R, d)
    z_mean = z_all.astype(np.float64).mean(1).astype(np.float32) if ablation == "mean" else np.zeros_like(z_all[:, 0])
    mlp_mean = mlp_all.astype(np.float64).mean(1).astype(np.float32) if ablation == "mean" else \
        np.zeros_like(mlp_all[:, 0])
    for cname, kind, ablated in conds:
        ivs = _ablation_ivs(groups, ablated, z_mean, mlp_mean, H, dh)
        for b, pf, cr in zip(batches, prefix, clean_runs):
            run = cr if kind == "none" else _one_row(m, [ids[i] for i in b], pf, ivs)
            met = _metrics(m, run, [tg[i] for i in b], groups)
            for j, i in enumerate(b):
                row = {"condition": cname, "kind": kind, "prompt": prompts[i], "logit_diff": met["ld"][j],
                       "correct": bool(met["correct"][j])}
                for g in names:
                    row[f"dla_{g}"] = met["dla"][g][j]
                per_rows.append(row)
    per = pd.DataFrame(per_rows)
    clean = per[per["kind"] == "none"].set_index("prompt")
    rows = []
    for cname, kind, ablated in conds:
        f = per[per["condition"] == cname].set_index("prompt")
        row = {"condition": cname, "kind": kind, "ablated": ablated,
               "n_components": sum(len(groups[g]) for g in ablated),
               "logit_diff": float(f["logit_diff"].mean()),
               "drop": float((clean["logit_diff"] - f["logit_diff"]).mean()),
               "accuracy": float(f["correct"].mean()),
               "accuracy_drop": float(clean["correct"].mean() - f["correct"].mean())}
        for g in names:
            row[f"dla_{g}"] = float(f[f"dla_{g}"].mean())
        rows.append(row)
    return MechanismAblation(frame=pd.DataFrame(rows), per_prompt=per, groups=groups, head_classes=classes,
                             dla_mean=dla_mean, ablation=ablation, prompts=prompts,
                             extra={"thresholds": dict(min_frac=min_frac, share=share, mixed_share=mixed_share)})


def _one_row(m, seqs, pf, ivs):
    """The END row of every sequence through all layers (earlier keys and values from the clean runs'
    cache ``pf``) with interventions ``ivs`` (position 0 = END): z, head_out, mlp_out, final_scale, logits."""
    c = m.config
    R = len(seqs)
    k, v, prows = pf
    lens = np.ones(R, np.int32)
    starts = np.array([len(s) - 1 for s in seqs], np.int32)
    kw = iv.compile_interventions(ivs, lens, c, starts=starts) if ivs else {}
    cap = {"z": np.empty((c.n_layers, R, c.n_heads * c.d_head), np.float32),
           "head_out": np.empty((c.n_layers, c.n_heads, R, c.d_model), np.float32),
           "mlp_out": np.empty((c.n_layers, R, c.d_model), np.float32),
           "final_scale": np.empty(R, np.float32), "logits": np.empty((R, c.vocab_size), np.float32)}
    m._core.forward(lens, ids=np.array([s[-1] for s in seqs], np.int32), seq_starts=starts, prefix_k=k, prefix_v=v,
                    prefix_rows=prows, capture=cap, **kw)
    return cap


def _ablation_ivs(groups, ablated, z_mean, mlp_mean, H, dh):
    """Set patches at END (position 0 of the one-row runs): z of each ablated head, mlp_out of each ablated
    MLP layer, to the mean (or zero) values, for every sequence."""
    out = []
    by_layer = {}
    mlps = set()
    for g in ablated:
        for comp in groups[g]:
            if g.startswith("mlp"):
                mlps.add(int(comp))
            else:
                by_layer.setdefault(int(comp[0]), set()).add(int(comp[1]))
    for l, hs in sorted(by_layer.items()):
        hs = sorted(hs)
        val = z_mean[l].reshape(H, dh)[hs]
        out.append(iv.set_values("z", val[None, None], layers=[l], positions=[0], heads=hs))
    for l in sorted(mlps):
        out.append(iv.set_values("mlp_out", mlp_mean[l][None, None], layers=[l], positions=[0]))
    return out


def _metrics(m, run, targets, groups):
    """Per prompt: logit difference, correctness, and each group's DLA (its components' outputs at END
    through the run's own final-norm scale onto the target direction)."""
    c = m.config
    R = len(targets)
    lg = run["logits"].astype(np.float64)
    ld = np.array([lg[i, a] - (lg[i, neg].mean() if neg else 0.0) for i, (a, neg) in enumerate(targets)])
    correct = np.array([int(np.argmax(run["logits"][i])) == a for i, (a, _) in enumerate(targets)])
    WU = m.W_rows("W_U", sorted({t for a, neg in targets for t in [a] + list(neg)}))
    col = {t: j for j, t in enumerate(sorted({t for a, neg in targets for t in [a] + list(neg)}))}
    U0 = np.stack([WU[col[a]].astype(np.float64) - (WU[[col[t] for t in neg]].astype(np.float64).mean(0) if neg else 0.0)
                   for a, neg in targets])                                      # (R, d)
    U = run["final_scale"].astype(np.float64)[:, None] * m.W("ln_f_w").astype(np.float64)[None] * U0
    if c.norm == "layernorm":
        U = U - U.mean(1, keepdims=True)
    head_dla = np.einsum("lhrd,rd->rlh", run["head_out"].astype(np.float64), U)   # (R, L, H)
    mlp_dla = np.einsum("lrd,rd->rl", run["mlp_out"].astype(np.float64), U)     # (R, L)
    dla = {}
    for g, comps in groups.items():
        if g.startswith("mlp"):
            dla[g] = mlp_dla[:, [int(x) for x in comps]].sum(1) if comps else np.zeros(R)
        else:
            dla[g] = np.array([sum(head_dla[i, l, h] for l, h in comps) for i in range(R)]) if comps else np.zeros(R)
    return {"ld": ld, "correct": correct, "dla": dla}
