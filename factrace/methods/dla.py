"""Direct logit attribution (METHODS.md section 3): every component's contribution to a logit (or logit
difference) at one query position, every head split exactly into one term per source token, token groups
SUBJECT / RELATION / END / OTHER, head classes and the four mechanisms of Chughtai et al. 2024.

* :func:`dla` -- embeddings (token, and learned positions for GPT-2), every head split exactly into one
  term per source position, each layer's attention output bias ``b_O`` (it belongs to no head and no
  source: its own row), every MLP (its output bias ``b_down`` as its own row), the final norm's bias and
  the unembedding's bias (GPT-J's lm_head).
  The final norm's scale of the clean run is frozen (LayerNorm: after centering), so the parts add up to
  the clean logit (or logit difference) to float32 rounding.
* :func:`dla_dataset` -- the four mechanisms (subject heads, relation heads, mixed heads, MLP boosting)
  over a list of prompts.

The head-by-source products run in C (``factrace._attrib``).

Example:
    >>> import factrace
    >>> m = factrace.load("smollm2")                                                    # doctest: +SKIP
    >>> res = factrace.dla(m, "Fact: The Colosseum is in the country of", " Italy",
    ...                    subject="The Colosseum")                                        # doctest: +SKIP
    >>> res.total, res.logit            # equal to float32 rounding                         # doctest: +SKIP
    >>> res.mechanisms()                # subject / relation / mixed heads, MLP boosting     # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._common import (_char_span, _ids_of, _pd, _plt, _record_fields, _target_value, _tokens, _vocab_direction,
                      resolve_target, result_html)
from ._common import subject_span as _subject_span

GROUPS = ("SUBJECT", "RELATION", "END", "OTHER")
MECHANISMS = ("subject_heads", "relation_heads", "mixed_heads", "mlp_boosting", "other_heads", "direct")

# Capture set for attribution runs.
_DLA_CAPTURE = ["embed", "attn", "v_cache", "norm_scale_attn", "mlp_out", "final_scale"]


def subject_span(m, prompt, subject):
    """Token span ``(b, e)`` of ``subject`` in ``prompt``.

    ``subject`` is a string (the tokens whose character offsets overlap its first occurrence, from
    ``Tokenizer.encode_with_offsets``, the prompt encoded with special tokens like :meth:`Model.encode`)
    or a ``(b, e)`` token span (returned as is). Example: ``subject_span(m, "Fact: Paris is in", "Paris")``.
    """
    if subject is None:
        return None
    if isinstance(subject, str) and not isinstance(prompt, str):
        raise ValueError("a subject string needs the prompt as a string; pass a (b, e) token span instead")
    if not isinstance(subject, str):
        b, e = (int(x) for x in subject)
        if not 0 <= b < e:
            raise ValueError(f"bad subject span {subject!r}")
        return b, e
    return _subject_span(m, prompt, subject)


def token_groups(T: int, span=None, relation=None, end: int | None = None, m=None, prompt=None):
    """Group label per position (T,) object array from ``GROUPS``.

    END is the query position ``end`` (default T-1); SUBJECT the ``span`` [b, e); RELATION the tokens
    between the subject and END (default), or ``relation`` given as a string (first occurrence, via
    offsets; needs ``m`` and ``prompt``), a (b, e) span or a list of positions; OTHER the rest (BOS,
    "Fact:" prefix ...). Precedence: END > SUBJECT > RELATION > OTHER. Positions after END are OTHER.
    """
    end = T - 1 if end is None else (end + T if end < 0 else end)
    g = np.array(["OTHER"] * T, dtype=object)
    rel = []
    if relation is None:
        if span is not None:
            rel = list(range(span[1], end))
    elif isinstance(relation, str):
        after = 0
        if span is not None and isinstance(prompt, str):
            _, offs = m._tok().encode_with_offsets(prompt)
            after = offs[span[1] - 1][1] if span[1] - 1 < len(offs) else 0
        b, e, _ = _char_span(m, prompt, relation, "relation", after=after)
        rel = list(range(b, e))
    elif isinstance(relation, tuple) and len(relation) == 2:
        rel = list(range(int(relation[0]), int(relation[1])))
    else:
        rel = [int(p) + T if int(p) < 0 else int(p) for p in relation]
    for p in rel:
        if 0 <= p < T:
            g[p] = "RELATION"
    if span is not None:
        for p in range(span[0], min(span[1], T)):
            g[p] = "SUBJECT"
    g[end] = "END"
    return g


def _check_linear(m):
    if m.config.final_softcap and m.config.final_softcap > 0:
        raise ValueError(f"{m.name}: final_logit_softcapping={m.config.final_softcap} makes the logits a "
                         "non-linear function of the residual stream, so direct logit attribution does not add up; "
                         "it is not supported")



# ---------------------------------------------------------------------------------------------------------
# the head-by-source kernels


def head_source_split(m, run, position: int = -1, layers=None) -> np.ndarray:
    """Each head's output at ``position`` split into one vector per source position.

    Args:
        m: the model; run: a :class:`RunResult` that captured ``attn``, ``v_cache`` (and for Gemma 3
            ``norm_scale_attn``); position: the query position (negative counts from the end);
            layers: the layers wanted (default all).
    Returns: (nl, H, T, d) float32 with ``out[i, h, k] = A[l, h, q, k] * v_k W_O,h`` (Gemma 3: through the
        post-attention norm at the run's own scale). Summed over k it equals ``run.head_out[l, h, q]``;
        b_O is not included (it belongs to no source).

    Example:
        >>> r = m.run(ids, capture=["attn", "v_cache", "norm_scale_attn"])               # doctest: +SKIP
        >>> head_source_split(m, r).shape                                                  # doctest: +SKIP
        (12, 12, 9, 768)
    """
    from .. import _attrib

    c = m.config
    T = len(run.ids)
    q = position + T if position < 0 else position
    WO = [m.W("W_O", l) for l in range(c.n_layers)]
    kw = {}
    if c.post_norms:
        kw = dict(post_w=[m.W("post_attn_norm_w", l) for l in range(c.n_layers)],
                  post_scale=np.ascontiguousarray(run.norm_scale_attn[:, q]))
    lay = None if layers is None else np.asarray(list(layers), np.int64)
    return _attrib.split(run.attn, run.v_cache, WO, q, c.n_kv_heads, layers=lay, **kw)


def head_source_project(m, run, directions, positions) -> np.ndarray:
    """Every head's DLA split by source, onto given residual-stream directions, all layers at once.

    Args:
        directions: (J, d) or (J, L, d) directions u in the residual stream (per layer if 3-D);
        positions: (J,) query position of each direction (negative counts from the end).
    Returns: (J, L, H, T) float32, ``out[j, l, h, k] = A[l, h, q_j, k] * (v_{l,k,kv(h)} . W_O,h^T u)``;
        for Gemma 3 u is taken through the post-attention norm (``u * w_post * rs[l, q_j]``), so
        ``out.sum(-1) == head_out[:, :, q_j] @ u``. Cost: L * J * (d * H * dh + H * T * dh).
    """
    from .. import _attrib

    c = m.config
    T = len(run.ids)
    L = c.n_layers
    q = np.asarray(positions, np.int64).reshape(-1)
    q = np.where(q < 0, q + T, q)
    U = np.asarray(directions, np.float64)
    if U.ndim == 2:
        U = np.broadcast_to(U[:, None, :], (U.shape[0], L, U.shape[1]))
    U = np.array(U, np.float64)
    if c.post_norms:
        for l in range(L):
            U[:, l] *= m.W("post_attn_norm_w", l)[None, :].astype(np.float64) * \
                run.norm_scale_attn[l, q].astype(np.float64)[:, None]
    WO = [m.W("W_O", l) for l in range(L)]
    return _attrib.project(run.attn, run.v_cache, WO, np.ascontiguousarray(U, np.float32), q, c.n_kv_heads)



# ---------------------------------------------------------------------------------------------------------
# DLA


@dataclass
class DLAResult:
    """Direct logit attribution at one query position (see :func:`dla`). L layers, H heads, T tokens
    (the prompt up to and including the query position ``position``, which is T - 1).

    Arrays (float64 unless noted):
        head_source (L, H, T) float32: each head's DLA per source position (0 after the query);
        heads (L, H): head_source summed over sources; attn_bias (L,): b_O of each layer;
        mlp (L,): each MLP's output without its bias b_down; mlp_bias (L,): b_down;
        embed: token embedding; pos: learned position embedding (GPT-2, else 0); final_bias: the final
        LayerNorm's bias (else 0); unembed_bias: the unembedding's bias b_U (GPT-J's lm_head, else 0).
    Scalars: ``logit`` the clean target logit (or logit difference), ``total`` the sum of all parts.
    Labels: ``tokens`` (T,), ``groups`` (T,) from ``GROUPS``, ``subject`` span, ``target`` label.
    """

    prompt: str | None
    ids: np.ndarray
    tokens: list
    position: int
    target: str
    target_ids: tuple
    logit: float
    groups: np.ndarray
    subject: tuple | None
    head_source: np.ndarray
    attn_bias: np.ndarray
    mlp: np.ndarray
    mlp_bias: np.ndarray
    embed: float
    pos: float
    final_bias: float
    n_layers: int = 0
    n_heads: int = 0
    unembed_bias: float = 0.0
    extra: dict = field(default_factory=dict)

    def _repr_html_(self):
        return result_html(self, figure="plot_mechanisms",
                           title=f"DLAResult: target {self.target}, logit {self.logit:.4f}, sum of parts {self.total:.4f}")

    @property
    def heads(self) -> np.ndarray:
        """(L, H) each head's DLA (sum over sources)."""
        return self.head_source.astype(np.float64).sum(-1)

    @property
    def total(self) -> float:
        """Sum of every part: equals ``logit`` to float32 rounding."""
        return float(self.heads.sum() + self.attn_bias.sum() + self.mlp.sum() + self.mlp_bias.sum()
                     + self.embed + self.pos + self.final_bias + self.unembed_bias)

    @property
    def head_groups(self) -> np.ndarray:
        """(L, H, 4) each head's DLA summed over the sources of each group, in ``GROUPS`` order."""
        hs = self.head_source.astype(np.float64)
        return np.stack([hs[..., self.groups == g].sum(-1) for g in GROUPS], -1)

    # -- classification ------------------------------------------------------------------------
    def classify(self, min_frac: float = 0.05, share: float = 0.6, mixed_share: float = 0.25) -> np.ndarray:
        """(L, H) class of each head: ``"subject"``, ``"relation"``, ``"mixed"``, ``"other"`` (significant
        but dominated by END / OTHER sources or split otherwise) or ``""`` (not significant).

        A head is significant if ``|DLA_h| >= min_frac * sum_h' |DLA_h'|`` (default 5% of all heads'
        absolute DLA). Its group shares are taken in the direction of its own sign: ``s_g =
        max(0, sign(DLA_h) * DLA_h,g) / sum_g' max(0, sign(DLA_h) * DLA_h,g')``. Subject head: ``s_SUBJECT
        >= share`` (0.6); relation head: ``s_RELATION >= share``; mixed head: both ``>= mixed_share``
        (0.25) and neither reaches ``share``.
        """
        return _classify(self.heads, self.head_groups, min_frac, share, mixed_share)

    def mechanisms(self, min_frac: float = 0.05, share: float = 0.6, mixed_share: float = 0.25) -> dict:
        """How much of the logit each mechanism carries (thresholds as in :meth:`classify`).

        Keys: ``subject_heads``, ``relation_heads``, ``mixed_heads`` (full DLA of the heads of each class),
        ``mlp_boosting`` (all MLPs' DLA at END, biases excluded), ``other_heads`` (every other head),
        ``direct`` (embeddings, b_O, b_down, the final-norm and unembedding biases); they sum to ``total``
        (== ``logit``),
        also reported, with ``n_subject_heads`` etc.
        """
        cls = self.classify(min_frac, share, mixed_share)
        h = self.heads
        out = {"subject_heads": float(h[cls == "subject"].sum()),
               "relation_heads": float(h[cls == "relation"].sum()),
               "mixed_heads": float(h[cls == "mixed"].sum()),
               "mlp_boosting": float(self.mlp.sum()),
               "other_heads": float(h[(cls == "other") | (cls == "")].sum()),
               "direct": float(self.embed + self.pos + self.final_bias + self.unembed_bias + self.attn_bias.sum()
                               + self.mlp_bias.sum())}
        out["total"] = float(sum(out[k] for k in MECHANISMS))
        out["logit"] = self.logit
        for k in ("subject", "relation", "mixed"):
            out[f"n_{k}_heads"] = int((cls == k).sum())
        return out

    # -- frames --------------------------------------------------------------------------------
    def frame(self):
        """Tidy ``pandas.DataFrame``, one row per part: columns ``component`` (embed, pos, head, attn_bias,
        mlp, mlp_bias, final_bias, and unembed_bias when the model has one), ``layer``, ``head``, ``source_pos``, ``source_token``, ``group``,
        ``value``. Head rows are one per (layer, head, source position <= query). Missing ints are <NA>."""
        pd = _pd()
        L, H, T = self.head_source.shape
        q = self.position
        rows = []
        ll, hh, kk = np.meshgrid(np.arange(L), np.arange(H), np.arange(q + 1), indexing="ij")
        heads = pd.DataFrame({"component": "head", "layer": ll.ravel(), "head": hh.ravel(), "source_pos": kk.ravel(),
                              "source_token": np.asarray(self.tokens, dtype=object)[kk.ravel()],
                              "group": self.groups[kk.ravel()],
                              "value": self.head_source[:, :, :q + 1].astype(np.float64).ravel()})
        for comp, arr in (("attn_bias", self.attn_bias), ("mlp", self.mlp), ("mlp_bias", self.mlp_bias)):
            for l in range(L):
                rows.append({"component": comp, "layer": l, "value": float(arr[l])})
        for comp in ("embed", "pos", "final_bias") + (("unembed_bias",) if self.unembed_bias else ()):
            rows.append({"component": comp, "value": float(getattr(self, comp))})
        rest = pd.DataFrame(rows)
        df = pd.concat([heads, rest], ignore_index=True)
        for col in ("layer", "head", "source_pos"):
            df[col] = df[col].astype("Int64")
        return df[["component", "layer", "head", "source_pos", "source_token", "group", "value"]]

    def head_frame(self, **thresholds):
        """One row per head: ``layer``, ``head``, the DLA from each group (SUBJECT, RELATION, END, OTHER),
        ``total`` and ``cls`` (:meth:`classify`, keyword thresholds passed on)."""
        pd = _pd()
        L, H, _ = self.head_source.shape
        hg = self.head_groups
        ll, hh = np.meshgrid(np.arange(L), np.arange(H), indexing="ij")
        d = {"layer": ll.ravel(), "head": hh.ravel()}
        for i, g in enumerate(GROUPS):
            d[g] = hg[..., i].ravel()
        d["total"] = self.heads.ravel()
        d["cls"] = self.classify(**thresholds).ravel()
        return pd.DataFrame(d)

    def group_frame(self):
        """Totals per token group over all heads (sources), one row per group."""
        pd = _pd()
        hg = self.head_groups.sum((0, 1))
        return pd.DataFrame({"group": list(GROUPS), "value": hg})

    # -- plots ---------------------------------------------------------------------------------
    def plot_heads(self, group: str | None = None, ax=None):
        """Head x layer heatmap of DLA (all sources, or one group of ``GROUPS``; ``group="all"`` draws
        the four groups side by side). Returns a matplotlib Figure."""
        Figure = _plt()
        groups = list(GROUPS) if group == "all" else [group]
        fig = ax.figure if ax is not None else Figure(figsize=(3.2 * len(groups) + 1, 3.5), layout="constrained")
        axes = [ax] if ax is not None else fig.subplots(1, len(groups), squeeze=False)[0]
        hg = self.head_groups
        vals = [self.heads if g is None else hg[..., GROUPS.index(g)] for g in groups]
        v = max(1e-12, max(np.abs(x).max() for x in vals))
        for a, g, x in zip(axes, groups, vals):
            im = a.imshow(x.T, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto", origin="lower")
            a.set_xlabel("layer")
            a.set_ylabel("head")
            a.set_title(f"DLA {'all sources' if g is None else 'from ' + g}", fontsize=9)
        fig.colorbar(im, ax=list(axes), shrink=0.8, label=f"DLA {self.target}")
        return fig

    def plot_mechanisms(self, ax=None, **thresholds):
        """Bar of the mechanisms' shares of the logit (:meth:`mechanisms`). Returns a Figure."""
        return _plot_mechanism_bars([self.mechanisms(**thresholds)], [self.prompt or "prompt"], ax=ax)


def _classify(heads, head_groups, min_frac, share, mixed_share):
    L, H = heads.shape
    out = np.full((L, H), "", dtype=object)
    tot_abs = np.abs(heads).sum()
    if tot_abs <= 0:
        return out
    sig = np.abs(heads) >= min_frac * tot_abs
    s = np.sign(heads)[..., None]
    pos = np.maximum(0.0, s * head_groups)
    denom = pos.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sh = np.where(denom[..., None] > 0, pos / np.where(denom > 0, denom, 1)[..., None], 0.0)
    sS, sR = sh[..., GROUPS.index("SUBJECT")], sh[..., GROUPS.index("RELATION")]
    out[sig] = "other"
    out[sig & (sS >= mixed_share) & (sR >= mixed_share)] = "mixed"
    out[sig & (sS >= share)] = "subject"
    out[sig & (sR >= share)] = "relation"
    return out


def _plot_mechanism_bars(mechs, labels, ax=None, errors=None):
    Figure = _plt()
    fig = ax.figure if ax is not None else Figure(figsize=(max(4, 1.0 + 0.9 * len(mechs)), 3.8), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    colors = {"subject_heads": "#1f77b4", "relation_heads": "#ff7f0e", "mixed_heads": "#9467bd",
              "mlp_boosting": "#2ca02c", "other_heads": "#c7c7c7", "direct": "#8c564b"}
    x = np.arange(len(mechs))
    bottom_pos = np.zeros(len(mechs))
    bottom_neg = np.zeros(len(mechs))
    for k in MECHANISMS:
        v = np.array([mm[k] for mm in mechs])
        b = np.where(v >= 0, bottom_pos, bottom_neg)
        ax.bar(x, v, bottom=b, color=colors[k], label=k.replace("_", " "), width=0.6)
        bottom_pos += np.maximum(v, 0)
        bottom_neg += np.minimum(v, 0)
    ax.scatter(x, [mm["logit"] for mm in mechs], color="k", marker="_", s=400, zorder=3, label="logit")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels([str(s)[:28] for s in labels], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("DLA")
    ax.legend(fontsize=7, loc="best")
    return fig


def _dla_from_run(m, r, prompt, target, subject, relation, prompt_text=None):
    """DLA at the LAST position of a run (of the prompt cut after the query position) that captured
    _DLA_CAPTURE with ``logits="last"``."""
    c = m.config
    T = len(r.ids)
    L, H = c.n_layers, c.n_heads
    q = T - 1
    pos_ids, neg_ids, label = resolve_target(m, target, default_id=int(np.argmax(r.logits[-1])))
    u0 = _vocab_direction(m, pos_ids, neg_ids)
    rs = float(r.final_scale[-1])
    u = rs * m.W("ln_f_w").astype(np.float64) * u0
    final_bias = 0.0
    if c.norm == "layernorm":
        u = u - u.mean()
        if m.W("ln_f_b") is not None:
            final_bias = float(m.W("ln_f_b").astype(np.float64) @ u0)
    b_U = m.W("b_U")
    unembed_bias = _target_value(b_U, pos_ids, neg_ids) if b_U is not None else 0.0
    hs = head_source_project(m, r, u[None, :], [q])[0]
    attn_bias = np.array([m.b_O(l).astype(np.float64) @ u for l in range(L)])
    mlp_bias = np.zeros(L)
    mlp = np.empty(L)
    for l in range(L):
        bd = m.W("b_down", l)
        if bd is not None and not c.post_norms:
            mlp_bias[l] = bd.astype(np.float64) @ u
            mlp[l] = r.mlp_out[l, q].astype(np.float64) @ u - mlp_bias[l]
        else:
            mlp[l] = r.mlp_out[l, q].astype(np.float64) @ u
    e = r.embed[q].astype(np.float64)
    pos = 0.0
    if c.learned_pos and m.W("W_pos") is not None:
        wp = m.W("W_pos")[q].astype(np.float64)
        pos = float(wp @ u)
        e = e - wp
    span = subject_span(m, prompt_text if prompt_text is not None else prompt, subject)
    groups = token_groups(T, span, relation, end=q, m=m, prompt=prompt_text)
    return DLAResult(
        prompt=prompt_text, ids=np.asarray(r.ids), tokens=_tokens(m, r.ids), position=q, target=label,
        target_ids=(tuple(pos_ids), tuple(neg_ids)), logit=_target_value(r.logits[-1], pos_ids, neg_ids),
        groups=groups, subject=span, head_source=hs, attn_bias=attn_bias, mlp=mlp, mlp_bias=mlp_bias,
        embed=float(e @ u), pos=pos, final_bias=final_bias, n_layers=L, n_heads=H, unembed_bias=unembed_bias,
        extra={"final_scale": rs, "direction": u})


def dla(m, prompt, target=None, subject=None, relation=None, position: int = -1) -> DLAResult:
    """Direct logit attribution of every component at one query position (METHODS.md section 3).

    Args:
        m: a :class:`factrace.Model`.
        prompt: text (encoded with the model's special tokens) or token ids (T,).
        target: None (the clean run's top-1 token at ``position``), a token id, a string (its first token,
            without special tokens, e.g. ``" Italy"``), or ``(a, b)`` for the logit difference
            ``logit[a] - logit[b]`` (``b`` may be a list: ``logit[a] - mean_i logit[b_i]``).
        subject: the subject string (tokens overlapping its first occurrence, via tokenizer offsets) or a
            ``(b, e)`` token span; None leaves no SUBJECT group.
        relation: RELATION tokens; default the tokens between the subject and the query position; or a
            string (first occurrence after the subject), a ``(b, e)`` span, or a list of positions.
        position: the query position (default -1, END).

    Returns: a :class:`DLAResult` over the prompt cut after ``position`` (later tokens cannot affect it;
    the run computes only that row's logits). The final norm's scale is frozen at the clean run's value at
    ``position``: RMSNorm parts contribute ``c * rs * w . W_U[t]``, LayerNorm parts ``(c - mean(c)) * rs *
    w . W_U[t]``, the final bias ``b . W_U[t]`` and an unembedding bias (GPT-J) ``b_U[t]``. The parts add
    up to the clean logit (difference) to float32 rounding. Raises ValueError for models with final logit
    softcapping (not linear).

    Example:
        >>> res = factrace.dla(m, "Fact: The Colosseum is in the country of", (" Italy", " France"),
        ...                    subject="The Colosseum")                                     # doctest: +SKIP
        >>> res.head_frame().sort_values("total").tail(3)                                   # doctest: +SKIP
        >>> res.plot_heads("all"); res.plot_mechanisms()                                     # doctest: +SKIP
    """
    _check_linear(m)
    ids, text = _ids_of(m, prompt)
    ids = _cut(ids, position)
    r = m.run(ids, capture=_DLA_CAPTURE, logits="last")
    return _dla_from_run(m, r, ids, target, subject, relation, prompt_text=text)


def _cut(ids, position):
    """The prompt up to and including the query position (later tokens cannot influence it)."""
    T = len(ids)
    q = position + T if position < 0 else position
    if not 0 <= q < T:
        raise IndexError(f"position {position} out of range for {T} tokens")
    return ids[:q + 1]


@dataclass
class DatasetDLA:
    """Mechanism summary over prompts (see :func:`dla_dataset`). ``frame`` has one row per prompt with
    ``prompt``, ``subject``, ``target``, ``correct`` (target is the clean top-1), ``logit`` and the
    mechanisms' DLA (``MECHANISMS``) and head counts; ``results`` the per-prompt :class:`DLAResult`."""

    frame: object
    results: list
    thresholds: dict

    _repr_html_ = result_html

    def summary(self):
        """Mean, std and mean share of the logit (mechanism / logit) of each mechanism over prompts."""
        pd = _pd()
        f = self.frame
        rows = []
        for k in MECHANISMS:
            share = f[k] / f["logit"].where(f["logit"].abs() > 1e-9)
            rows.append({"mechanism": k, "mean": f[k].mean(), "std": f[k].std(ddof=0), "mean_share": share.mean()})
        return pd.DataFrame(rows)

    def head_counts(self):
        """(L, H) fraction of prompts in which each head is a subject / relation / mixed head: dict of arrays."""
        out = {}
        for k in ("subject", "relation", "mixed"):
            out[k] = np.mean([r.classify(**self.thresholds) == k for r in self.results], axis=0)
        return out

    def plot(self, ax=None, per_prompt: bool = False):
        """Stacked bar of the mechanisms: their mean over prompts (or one bar per prompt). Figure."""
        if per_prompt:
            return _plot_mechanism_bars(self.frame.to_dict("records"), list(self.frame["prompt"]), ax=ax)
        mean = {k: float(self.frame[k].mean()) for k in MECHANISMS + ("logit",)}
        return _plot_mechanism_bars([mean], [f"mean over {len(self.frame)} prompts"], ax=ax)


def dla_dataset(m, records, target=None, contrast: str | None = None, only_correct: bool = False,
                batch_size: int = 16, min_frac: float = 0.05, share: float = 0.6, mixed_share: float = 0.25,
                position: int = -1) -> DatasetDLA:
    """Direct logit attribution and the four mechanisms over a list of prompts.

    Args:
        records: :class:`factrace.datasets.FactRecord` objects, dicts with ``prompt``, ``subject`` and
            ``target`` or ``object``, or ``(prompt, subject, target)`` tuples.
        target: overrides every record's target (None: the record's target, first token of
            ``" " + object``; records without one use the clean top-1; ``"top1"``: always the clean top-1).
        contrast: None, or ``"candidates"``: the logit difference between the target and the mean of the
            other candidate attributes of the record's relation (``factrace.datasets.facts_candidates``).
        only_correct: keep only prompts whose clean top-1 token is the target.
        batch_size: prompts per batched forward pass. Thresholds: see :meth:`DLAResult.classify`.

    Returns: :class:`DatasetDLA`.

    Example:
        >>> recs = factrace.datasets.load_dataset("facts")[:20]                              # doctest: +SKIP
        >>> s = factrace.dla_dataset(m, recs); s.summary(); s.plot()              # doctest: +SKIP
    """
    _check_linear(m)
    pd = _pd()
    cands = None
    if contrast == "candidates":
        from ..study.datasets import facts_candidates

        cands = facts_candidates()
    elif contrast is not None:
        raise ValueError("contrast must be None or 'candidates'")
    items = [_record_fields(rec) for rec in records]
    th = dict(min_frac=min_frac, share=share, mixed_share=mixed_share)
    results, rows = [], []
    for i0 in range(0, len(items), batch_size):
        chunk = items[i0:i0 + batch_size]
        ids = [_cut(m.encode(p) if isinstance(p, str) else np.asarray(p, np.int32), position) for p, *_ in chunk]
        runs = m.run(ids, capture=_DLA_CAPTURE, logits="last")
        for (p, subj, tgt, rel, obj), s_ids, r in zip(chunk, ids, runs):
            t = target if target is not None else tgt
            if isinstance(t, str) and t == "top1":
                t = None
            if cands is not None and rel in cands and t is not None and not isinstance(t, tuple):
                others = [" " + c for c in cands[rel] if obj is None or c != str(obj).strip()]
                t = (t, others)
            res = _dla_from_run(m, r, s_ids, t, subj, None, prompt_text=p if isinstance(p, str) else None)
            top1 = int(np.argmax(r.logits[-1]))
            correct = top1 == res.target_ids[0][0]
            if only_correct and not correct:
                continue
            mech = res.mechanisms(**th)
            rows.append({"prompt": p if isinstance(p, str) else str(list(s_ids)), "subject": subj,
                         "target": res.target, "correct": correct, **mech})
            results.append(res)
    return DatasetDLA(frame=pd.DataFrame(rows), results=results, thresholds=th)

