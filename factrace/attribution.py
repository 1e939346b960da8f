"""Direct logit attribution, logit lens and attention-edge knockout (METHODS.md sections 3, 4, 5).

Everything here runs on :meth:`factrace.Model.run` captures plus the C kernels of ``factrace._attrib``:

* :func:`dla` -- direct logit attribution of every component at one query position (default: the last):
  embeddings (token, and learned positions for GPT-2), every head split exactly into one term per source
  position, each layer's attention output bias ``b_O`` (it belongs to no head and no source: its own row),
  every MLP (its output bias ``b_down`` as its own row) and the final norm's bias. The final norm's scale
  of the clean run is frozen (LayerNorm: after centering), so the parts add up to the clean logit (or
  logit difference) to float32 rounding. Token groups SUBJECT / RELATION / END / OTHER summarise the
  sources; heads are classified as subject / relation / mixed heads (Chughtai et al. 2024).
* :func:`dla_dataset` -- the four mechanisms (subject heads, relation heads, mixed heads, MLP boosting)
  over a list of prompts.
* :func:`logit_lens` -- per layer and position the top-k tokens and a target's rank / probability; each
  residual is normalised with its own final-norm scale. Also Geva et al.'s attribute extraction:
  attention / MLP outputs at the last position projected on the embedding matrix (no final norm).
* :func:`attention_knockout` / :func:`attention_knockout_dataset` -- Geva et al. 2023's edge knockout
  from the last position to the subject, the non-subject tokens or itself over a window of layers; all
  windows of one prompt run as one batched forward pass.

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

GROUPS = ("SUBJECT", "RELATION", "END", "OTHER")
MECHANISMS = ("subject_heads", "relation_heads", "mixed_heads", "mlp_boosting", "other_heads", "direct")
KNOCKOUT_KINDS = ("subject", "non_subject", "last")

# Capture set for attribution runs.
_DLA_CAPTURE = ["embed", "attn", "v_cache", "norm_scale_attn", "mlp_out", "final_scale"]


# ---------------------------------------------------------------------------------------------------------
# helpers: prompts, spans, targets


def _ids_of(m, prompt):
    if isinstance(prompt, str):
        return m.encode(prompt), prompt
    ids = np.asarray(prompt, dtype=np.int32).reshape(-1)
    return ids, None


def _tokens(m, ids):
    try:
        return [str(t) for t in m.token_strings(ids)]
    except Exception:  # no tokenizer: label by id
        return [f"<{int(i)}>" for i in ids]


def _char_span(m, prompt: str, text: str, what: str, after: int = 0):
    """Token span [b, e) of the tokens whose character spans overlap the first occurrence of ``text``."""
    tok = m._tok()
    if not hasattr(tok, "encode_with_offsets"):
        raise ValueError(f"{what}: this model's tokenizer gives no character offsets; pass a (b, e) token span")
    start = prompt.find(text, after)
    if start < 0:
        start = prompt.find(text)
    if start < 0 or not text:
        raise ValueError(f"{what} {text!r} does not occur in the prompt {prompt!r}")
    end = start + len(text)
    _, offs = tok.encode_with_offsets(prompt)
    hit = [i for i, (s, e) in enumerate(offs) if e > s and s < end and e > start]
    if not hit:
        raise ValueError(f"{what} {text!r} covers no token of the prompt")
    return hit[0], hit[-1] + 1, end


def subject_span(m, prompt, subject):
    """Token span ``(b, e)`` of ``subject`` in ``prompt``.

    ``subject`` is a string (the tokens whose character offsets overlap its first occurrence, from
    ``Tokenizer.encode_with_offsets``, the prompt encoded with special tokens like :meth:`Model.encode`)
    or a ``(b, e)`` token span (returned as is). Example: ``subject_span(m, "Fact: Paris is in", "Paris")``.
    """
    if subject is None:
        return None
    from .tracing import subject_span as _subject_span

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


def _token_id(m, t):
    if isinstance(t, (int, np.integer)):
        t = int(t)
        if not 0 <= t < m.config.vocab_size:
            raise ValueError(f"target token id {t} is outside the vocabulary")
        return t
    if isinstance(t, str):
        ids = m.encode(t, add_special_tokens=False)
        if len(ids) == 0:
            raise ValueError(f"target {t!r} encodes to no token")
        return int(ids[0])
    raise TypeError(f"a target token must be an int id or a string, got {type(t).__name__}")


def resolve_target(m, target, default_id: int | None = None):
    """``(pos_ids, neg_ids, label)`` for a target spec.

    ``target``: None (``default_id``, e.g. the clean top-1 token), a token id, a string (its FIRST token,
    encoded without special tokens; use a leading space for a word after a space), or a pair ``(a, b)``
    for the logit difference ``logit[a] - logit[b]``; ``b`` may be a list for ``logit[a] - mean(logit[b_i])``.
    """
    if target is None:
        if default_id is None:
            raise ValueError("no target given")
        pos, neg = [int(default_id)], []
    elif isinstance(target, (tuple, list)) and len(target) == 2 and not isinstance(target, str):
        a, b = target
        pos = [_token_id(m, a)]
        neg = [_token_id(m, x) for x in b] if isinstance(b, (list, tuple, np.ndarray)) else [_token_id(m, b)]
        if any(x == pos[0] for x in neg):
            import warnings

            warnings.warn("contrast tokens equal to the target token (same first token) are dropped", stacklevel=3)
            neg = [x for x in neg if x != pos[0]]
        if not neg:
            raise ValueError("no contrast token left (empty list, or every one has the target's first token)")
    else:
        pos, neg = [_token_id(m, target)], []
    strs = _tokens(m, pos + neg)
    label = repr(strs[0])
    if neg:
        label += " - " + (repr(strs[1]) if len(neg) == 1 else f"mean({', '.join(repr(s) for s in strs[1:])})")
    return pos, neg, label


def _vocab_direction(m, pos, neg):
    """(d,) float64 unembedding direction of a target: W_U[a] (- mean W_U[b])."""
    W_U = m.W("W_U")
    u = W_U[pos].astype(np.float64).sum(0)
    if neg:
        u = u - W_U[neg].astype(np.float64).mean(0)
    return u


def _target_value(logits_row, pos, neg):
    v = float(np.asarray(logits_row, np.float64)[pos].sum())
    if neg:
        v -= float(np.asarray(logits_row, np.float64)[neg].mean())
    return v


def _check_linear(m):
    if m.config.final_softcap and m.config.final_softcap > 0:
        raise ValueError(f"{m.name}: final_logit_softcapping={m.config.final_softcap} makes the logits a "
                         "non-linear function of the residual stream, so direct logit attribution does not add up; "
                         "it is not supported")


def _pd():
    try:
        import pandas as pd
    except ImportError as e:  # pragma: no cover
        raise ImportError("this needs pandas: pip install 'factrace[analysis]'") from e
    return pd


def _plt():
    """matplotlib's Figure class: figures are built without pyplot, so they work under Agg, in scripts
    and in notebooks (Jupyter renders a returned Figure) without touching the global backend."""
    from matplotlib.figure import Figure

    return Figure


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
    from . import _attrib

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
    from . import _attrib

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
        LayerNorm's bias (else 0).
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
    extra: dict = field(default_factory=dict)

    @property
    def heads(self) -> np.ndarray:
        """(L, H) each head's DLA (sum over sources)."""
        return self.head_source.astype(np.float64).sum(-1)

    @property
    def total(self) -> float:
        """Sum of every part: equals ``logit`` to float32 rounding."""
        return float(self.heads.sum() + self.attn_bias.sum() + self.mlp.sum() + self.mlp_bias.sum()
                     + self.embed + self.pos + self.final_bias)

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
        ``direct`` (embeddings, b_O, b_down and the final-norm bias); they sum to ``total`` (== ``logit``),
        also reported, with ``n_subject_heads`` etc.
        """
        cls = self.classify(min_frac, share, mixed_share)
        h = self.heads
        out = {"subject_heads": float(h[cls == "subject"].sum()),
               "relation_heads": float(h[cls == "relation"].sum()),
               "mixed_heads": float(h[cls == "mixed"].sum()),
               "mlp_boosting": float(self.mlp.sum()),
               "other_heads": float(h[(cls == "other") | (cls == "")].sum()),
               "direct": float(self.embed + self.pos + self.final_bias + self.attn_bias.sum() + self.mlp_bias.sum())}
        out["total"] = float(sum(out[k] for k in MECHANISMS))
        out["logit"] = self.logit
        for k in ("subject", "relation", "mixed"):
            out[f"n_{k}_heads"] = int((cls == k).sum())
        return out

    # -- frames --------------------------------------------------------------------------------
    def frame(self):
        """Tidy ``pandas.DataFrame``, one row per part: columns ``component`` (embed, pos, head, attn_bias,
        mlp, mlp_bias, final_bias), ``layer``, ``head``, ``source_pos``, ``source_token``, ``group``,
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
        for comp in ("embed", "pos", "final_bias"):
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
        embed=float(e @ u), pos=pos, final_bias=final_bias, n_layers=L, n_heads=H,
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
    w . W_U[t]`` and the final bias ``b . W_U[t]``. The parts add up to the clean logit (difference) to
    float32 rounding. Raises ValueError for models with final logit softcapping (not linear).

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


def _record_fields(rec):
    """(prompt, subject, target, relation_key, object) from a FactRecord, a dict or a tuple."""
    if isinstance(rec, str):
        return rec, None, None, None, None
    if isinstance(rec, (tuple, list)):
        rec = list(rec) + [None] * (3 - len(rec))
        return rec[0], rec[1], rec[2], None, None
    get = rec.get if isinstance(rec, dict) else (lambda k, dflt=None: getattr(rec, k, dflt))
    obj = get("object")
    tgt = get("target")
    if tgt is None and obj is not None:
        tgt = " " + str(obj).lstrip()
    return get("prompt"), get("subject"), tgt, get("relation"), obj


@dataclass
class DatasetDLA:
    """Mechanism summary over prompts (see :func:`dla_dataset`). ``frame`` has one row per prompt with
    ``prompt``, ``subject``, ``target``, ``correct`` (target is the clean top-1), ``logit`` and the
    mechanisms' DLA (``MECHANISMS``) and head counts; ``results`` the per-prompt :class:`DLAResult`."""

    frame: object
    results: list
    thresholds: dict

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
        >>> s = factrace.attribution.dla_dataset(m, recs); s.summary(); s.plot()              # doctest: +SKIP
    """
    _check_linear(m)
    pd = _pd()
    cands = None
    if contrast == "candidates":
        from .datasets import facts_candidates

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


# ---------------------------------------------------------------------------------------------------------
# logit lens


def _final_norm(m, x):
    """Final norm applied row-wise with each row's own scale, float32 like the C core."""
    return m.final_norm(x)


def _softmax64(z):
    z = np.asarray(z, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@dataclass
class LensResult:
    """Logit lens of one prompt (see :func:`logit_lens`). R = L + 1 rows (row 0: the embeddings, row i:
    the output of block i - 1; the last row gives the model's own logits), P positions, k top tokens.

    Arrays: ``positions`` (P,), ``topk_ids`` / ``topk_probs`` / ``topk_logits`` (R, P, k),
    ``target_rank`` (R, P) (0 = top-1), ``target_prob`` / ``target_logit`` (R, P).
    Attribute extraction at the last position: ``sub_top1`` (L, 2) the top-1 token of the attention (col 0)
    and MLP (col 1) output projected on ``project_on`` without the final norm; ``extracts`` (L, 2) bool:
    it equals ``prediction`` (the model's top-1 at the last position).
    """

    prompt: str | None
    ids: np.ndarray
    tokens: list
    positions: np.ndarray
    layer_labels: list
    target: int
    target_str: str
    prediction: int
    prediction_str: str
    topk_ids: np.ndarray
    topk_probs: np.ndarray
    topk_logits: np.ndarray
    target_rank: np.ndarray
    target_prob: np.ndarray
    target_logit: np.ndarray
    sub_top1: np.ndarray
    extracts: np.ndarray
    project_on: str
    top_strings: list = field(default_factory=list)

    @property
    def attribute_extraction(self) -> dict:
        """{"attn": bool (some attention output extracts the prediction), "mlp": bool, "layers_attn": [...],
        "layers_mlp": [...]}"""
        return {"attn": bool(self.extracts[:, 0].any()), "mlp": bool(self.extracts[:, 1].any()),
                "layers_attn": list(np.nonzero(self.extracts[:, 0])[0]),
                "layers_mlp": list(np.nonzero(self.extracts[:, 1])[0])}

    def table(self, what: str = "token"):
        """DataFrame (rows: layers, columns: positions) of the top-1 ``"token"``, its ``"prob"``, or the
        target's ``"rank"`` / ``"target_prob"``."""
        pd = _pd()
        cols = [f"{int(p)}:{self.tokens[int(p)]}" for p in self.positions]
        if what == "token":
            data = [[self.top_strings[i][j][0] for j in range(len(self.positions))] for i in range(len(self.layer_labels))]
        elif what == "prob":
            data = self.topk_probs[..., 0]
        elif what == "rank":
            data = self.target_rank
        elif what == "target_prob":
            data = self.target_prob
        else:
            raise ValueError("what must be 'token', 'prob', 'rank' or 'target_prob'")
        return pd.DataFrame(data, index=self.layer_labels, columns=cols)

    def frame(self):
        """Tidy frame: layer, position, token (input), k, top token, prob, logit."""
        pd = _pd()
        R, P, K = self.topk_ids.shape
        rows = []
        for i in range(R):
            for j in range(P):
                for k in range(K):
                    rows.append({"layer": self.layer_labels[i], "position": int(self.positions[j]),
                                 "input_token": self.tokens[int(self.positions[j])], "k": k,
                                 "token": self.top_strings[i][j][k], "token_id": int(self.topk_ids[i, j, k]),
                                 "prob": float(self.topk_probs[i, j, k]), "logit": float(self.topk_logits[i, j, k])})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """The lens table: top-1 probability as colour, the top-1 token as text. Returns a Figure."""
        Figure = _plt()
        R, P = self.topk_probs.shape[:2]
        fig = ax.figure if ax is not None else Figure(figsize=(1.1 * P + 2, 0.32 * R + 1.5), layout="constrained")
        ax = ax if ax is not None else fig.subplots()
        im = ax.imshow(self.topk_probs[..., 0], cmap="Blues", vmin=0, vmax=1, aspect="auto", origin="lower")
        for i in range(R):
            for j in range(P):
                ax.text(j, i, self.top_strings[i][j][0][:10], ha="center", va="center", fontsize=6,
                        color="w" if self.topk_probs[i, j, 0] > 0.6 else "k")
        ax.set_xticks(range(P))
        ax.set_xticklabels([self.tokens[int(p)][:10] for p in self.positions], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(R))
        ax.set_yticklabels(self.layer_labels, fontsize=6)
        ax.set_ylabel("layer (output of block)")
        fig.colorbar(im, ax=ax, label="top-1 probability")
        return fig


def logit_lens(m, prompt, target=None, k: int = 5, positions=None, project_on: str = "embed") -> LensResult:
    """Logit lens (METHODS.md section 5) and Geva et al.'s attribute extraction (section 4).

    Args:
        prompt: text or token ids. target: a token id or string (first token) whose rank / probability is
            tracked; default the model's top-1 prediction at the last position.
        k: top tokens kept per layer and position (default 5). positions: positions (default all).
        project_on: ``"embed"`` (default; W_E, Geva et al.) or ``"unembed"`` (W_U) for the attention / MLP
            outputs projected without the final norm.

    Every residual (embeddings, then each block's output) is passed through the final norm computed on
    THAT residual (its own scale), then the unembedding (and final softcapping, if the model has it);
    probabilities are a float64 softmax over the full vocabulary. The last row reproduces the model's logits.

    Example:
        >>> lens = factrace.logit_lens(m, "The Eiffel Tower is in the city of")                 # doctest: +SKIP
        >>> lens.table("token"); lens.attribute_extraction; lens.plot()                           # doctest: +SKIP
    """
    ids, text = _ids_of(m, prompt)
    r = m.run(ids, capture=["resid_pre", "resid_final", "attn_out", "mlp_out"])
    return _lens_from_run(m, r, text, target, k, positions, project_on)


def _lens_from_run(m, r, text, target, k, positions, project_on):
    c = m.config
    T = len(r.ids)
    L = c.n_layers
    pos = np.arange(T) if positions is None else np.asarray([p + T if p < 0 else p for p in positions], np.int64)
    states = np.concatenate([r.resid_pre, r.resid_final[None]], 0)[:, pos]  # (R, P, d)
    R, P, d = states.shape
    W_U = m.W("W_U")
    logits = (_final_norm(m, states.reshape(-1, d)) @ W_U.T).astype(np.float32)
    if c.final_softcap and c.final_softcap > 0:
        logits = (c.final_softcap * np.tanh(logits.astype(np.float64) / c.final_softcap)).astype(np.float32)
    logits = logits.reshape(R, P, -1)
    pred = int(np.argmax(r.logits[T - 1]))
    tgt = pred if target is None else _token_id(m, target)
    k = max(1, min(int(k), logits.shape[-1]))
    top = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    probs = _softmax64(logits)
    tl = logits[..., tgt]
    rank = (logits > tl[..., None]).sum(-1)
    W = m.W("W_E") if project_on == "embed" else m.W("W_U") if project_on == "unembed" else None
    if W is None:
        raise ValueError("project_on must be 'embed' or 'unembed'")
    sub = np.stack([r.attn_out[:, T - 1], r.mlp_out[:, T - 1]], 1)  # (L, 2, d)
    sub_top1 = np.argmax(sub.reshape(-1, d) @ W.T, -1).reshape(L, 2)
    strs_flat = _tokens(m, top.reshape(-1))
    top_strings = [[strs_flat[(i * P + j) * k:(i * P + j + 1) * k] for j in range(P)] for i in range(R)]
    toks = _tokens(m, r.ids)
    return LensResult(
        prompt=text, ids=np.asarray(r.ids), tokens=toks, positions=pos, layer_labels=["embed"] + list(range(L)),
        target=tgt, target_str=_tokens(m, [tgt])[0], prediction=pred, prediction_str=_tokens(m, [pred])[0],
        topk_ids=top, topk_probs=np.take_along_axis(probs, top, -1), topk_logits=np.take_along_axis(logits, top, -1),
        target_rank=rank, target_prob=probs[..., tgt], target_logit=tl, sub_top1=sub_top1,
        extracts=sub_top1 == pred, project_on=project_on, top_strings=top_strings)


def attribute_extraction_rate(m, records, project_on: str = "embed", batch_size: int = 16):
    """Geva et al.'s attribute extraction rate over prompts: per layer, the percentage of prompts whose
    attention (or MLP) output at the last position, projected on ``project_on`` (default the embedding
    matrix, no final norm), has the model's prediction as top-1 token.

    Returns a DataFrame with columns ``layer``, ``attn``, ``mlp`` (percent), and the attrs ``any_attn`` /
    ``any_mlp``: percent of prompts where some layer extracts it.
    """
    pd = _pd()
    items = [_record_fields(rec)[0] for rec in records]
    hits = []
    for i0 in range(0, len(items), batch_size):
        ids = [m.encode(p) if isinstance(p, str) else np.asarray(p, np.int32) for p in items[i0:i0 + batch_size]]
        runs = m.run(ids, capture=["resid_pre", "resid_final", "attn_out", "mlp_out"])
        runs = runs if isinstance(runs, list) else [runs]
        for r in runs:
            hits.append(_lens_from_run(m, r, None, None, 1, [-1], project_on).extracts)
    h = np.array(hits, bool).reshape(len(hits), m.config.n_layers, 2)
    df = pd.DataFrame({"layer": np.arange(m.config.n_layers), "attn": 100 * h[:, :, 0].mean(0),
                       "mlp": 100 * h[:, :, 1].mean(0)})
    df.attrs["any_attn"] = 100 * float(h[:, :, 0].any(1).mean())
    df.attrs["any_mlp"] = 100 * float(h[:, :, 1].any(1).mean())
    return df


# ---------------------------------------------------------------------------------------------------------
# attention knockout


def knockout_window(layer: int, n_layers: int, window: int = 9) -> range:
    """Layers blocked for the window centred at ``layer``: ``range(max(0, l - w // 2), min(L, l - (-w // 2)))``
    (w = 9: l-4 .. l+4, clipped)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def knockout_keys(T: int, span, kind, position: int | None = None) -> list:
    """Key positions for a knockout kind: ``"subject"`` (the span), ``"non_subject"`` (every position
    before the query outside the subject), ``"last"`` (the query itself), or an explicit list."""
    q = T - 1 if position is None else position
    if not isinstance(kind, str):
        return [int(p) + T if int(p) < 0 else int(p) for p in kind]
    if kind == "last":
        return [q]
    if span is None:
        raise ValueError(f"knockout kind {kind!r} needs a subject")
    b, e = span
    if kind == "subject":
        return [p for p in range(b, e) if p <= q]
    if kind == "non_subject":
        return [p for p in range(q) if not b <= p < e]
    raise ValueError(f"unknown knockout kind {kind!r}; use {KNOCKOUT_KINDS} or a list of positions")


@dataclass
class KnockoutResult:
    """Attention knockout of one prompt (see :func:`attention_knockout`).

    ``rel_change[kind]`` (L,) = (p_new - p_base) / p_base * 100 for the window centred at each layer;
    ``p_new[kind]`` (L,); ``p_base`` the clean probability of ``target``; ``keys[kind]`` the blocked keys."""

    prompt: str | None
    tokens: list
    subject: tuple | None
    target: int
    target_str: str
    p_base: float
    p_new: dict
    rel_change: dict
    keys: dict
    window: int

    def frame(self):
        """Tidy frame: kind, layer, window_lo, window_hi, p_base, p_new, rel_change."""
        pd = _pd()
        rows = []
        for kind, v in self.rel_change.items():
            L = len(v)
            for l in range(L):
                w = knockout_window(l, L, self.window)
                rows.append({"kind": kind, "layer": l, "window_lo": w.start, "window_hi": w.stop - 1,
                             "p_base": self.p_base, "p_new": float(self.p_new[kind][l]), "rel_change": float(v[l])})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """Knockout curves: relative change (%) per layer, one line per kind. Returns a Figure."""
        return _plot_knockout({k: (v, None) for k, v in self.rel_change.items()}, self.window,
                              f"{self.prompt or ''} -> {self.target_str!r}", ax)


def _plot_knockout(curves, window, title, ax=None):
    Figure = _plt()
    fig = ax.figure if ax is not None else Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = ax if ax is not None else fig.subplots()
    for kind, (v, err) in curves.items():
        x = np.arange(len(v))
        ax.plot(x, v, marker="o", ms=3, label=str(kind))
        if err is not None:
            ax.fill_between(x, v - err, v + err, alpha=0.2)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"layer (centre of a {window}-layer window)")
    ax.set_ylabel("change of p(top-1) [%]")
    ax.set_title(title[:70], fontsize=8)
    ax.legend(fontsize=7)
    return fig


def _knockout_seqs(m, ids, span, kinds, window, q):
    """(list of id copies, interventions, index: kind -> list of batch rows per layer, keys)."""
    from .interventions import block_attention

    L = m.config.n_layers
    T = len(ids)
    seqs, ivs, index, keys = [], [], {}, {}
    for kind in kinds:
        name = kind if isinstance(kind, str) else "custom"
        kk = knockout_keys(T, span, kind, q)
        keys[name] = kk
        rows = []
        for l in range(L):
            if not kk:
                rows.append(None)
                continue
            i = len(seqs)
            seqs.append(ids)
            ivs.append(block_attention(list(knockout_window(l, L, window)), queries=[q], keys=kk, seq=i))
            rows.append(i)
        index[name] = rows
    return seqs, ivs, index, keys


def attention_knockout(m, prompt, subject=None, kinds=KNOCKOUT_KINDS, window: int = 9, target=None,
                       position: int = -1) -> KnockoutResult:
    """Attention-edge knockout (Geva et al. 2023; METHODS.md section 4).

    For each layer l, the edges from the query (default the last position) to a set of keys are removed
    (pre-softmax score -inf, the rest renormalise) in every layer of the window centred at l
    (``window=9``: l-4 .. l+4, clipped). Kinds: ``"subject"``, ``"non_subject"`` (every earlier non-subject
    token), ``"last"`` (the query itself), or a list of positions. Metric: (p_new - p_base) / p_base * 100
    for the clean run's top-1 token (or ``target``). All windows of all kinds run as ONE batched forward
    pass (per-sequence interventions). An empty key set changes nothing.

    Example:
        >>> ko = factrace.attention_knockout(m, "Fact: The Colosseum is in the country of",
        ...                                  subject="The Colosseum")                         # doctest: +SKIP
        >>> ko.frame(); ko.plot()                                                             # doctest: +SKIP
    """
    ids, text = _ids_of(m, prompt)
    T = len(ids)
    q = position + T if position < 0 else position
    span = subject_span(m, text if text is not None else ids, subject)
    clean = m.run(ids[:q + 1], logits="last")
    p_clean = clean.probs[0]
    tgt = int(np.argmax(p_clean)) if target is None else _token_id(m, target)
    p_base = float(p_clean[tgt])
    ids_q = ids[:q + 1]
    seqs, ivs, index, keys = _knockout_seqs(m, ids_q, span, kinds, window, q)
    runs = m.run(seqs, interventions=ivs, logits="last") if seqs else []
    p_new, rel = {}, {}
    for name, rows in index.items():
        p = np.array([p_base if i is None else float(runs[i].probs[0, tgt]) for i in rows])
        p_new[name] = p
        rel[name] = (p - p_base) / p_base * 100.0
    return KnockoutResult(prompt=text, tokens=_tokens(m, ids_q), subject=span, target=tgt,
                          target_str=_tokens(m, [tgt])[0], p_base=p_base, p_new=p_new, rel_change=rel, keys=keys,
                          window=window)


@dataclass
class DatasetKnockout:
    """Attention knockout over prompts: ``frame`` (prompt, kind, layer, p_base, p_new, rel_change) and
    per-kind mean / 1.96-sigma error of the relative change (``mean[kind]``, ``err[kind]``, (L,))."""

    frame: object
    mean: dict
    err: dict
    window: int
    n: int

    def plot(self, ax=None):
        """Mean knockout curves with 95% bands. Returns a Figure."""
        return _plot_knockout({k: (self.mean[k], self.err[k]) for k in self.mean}, self.window,
                              f"attention knockout, mean over {self.n} prompts", ax)


def attention_knockout_dataset(m, records, kinds=KNOCKOUT_KINDS, window: int = 9, only_correct: bool = False):
    """:func:`attention_knockout` over prompts (records as in :func:`dla_dataset`; subjects needed for the
    subject / non-subject kinds). ``only_correct``: keep prompts whose top-1 is the record's target.
    Returns :class:`DatasetKnockout`."""
    pd = _pd()
    frames, curves = [], {}
    n = 0
    for rec in records:
        p, subj, tgt, _, _ = _record_fields(rec)
        if only_correct and tgt is not None:
            ids, _ = _ids_of(m, p)
            top = int(np.argmax(m.run(ids, logits="last").logits[0]))
            if top != _token_id(m, tgt):
                continue
        ko = attention_knockout(m, p, subj, kinds=kinds, window=window)
        f = ko.frame()
        f.insert(0, "prompt", p if isinstance(p, str) else str(p))
        frames.append(f)
        for k, v in ko.rel_change.items():
            curves.setdefault(k, []).append(v)
        n += 1
    mean = {k: np.mean(v, 0) for k, v in curves.items()}
    err = {k: 1.96 * np.std(v, 0) / np.sqrt(len(v)) for k, v in curves.items()}
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return DatasetKnockout(frame=frame, mean=mean, err=err, window=window, n=n)


__all__ = ["GROUPS", "MECHANISMS", "KNOCKOUT_KINDS", "dla", "dla_dataset", "DLAResult", "DatasetDLA",
           "logit_lens", "LensResult", "attribute_extraction_rate", "attention_knockout",
           "attention_knockout_dataset", "KnockoutResult", "DatasetKnockout", "head_source_split",
           "head_source_project", "subject_span", "token_groups", "resolve_target", "knockout_window",
           "knockout_keys"]
