"""Logit lens (METHODS.md section 5) and Geva et al.'s attribute extraction (section 4): each layer's
residual stream through the final norm at its own scale and the unembedding; attention and MLP outputs
at the last position projected on the embedding matrix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._common import _ids_of, _pd, _plt, _record_fields, _token_id, _tokens, result_html


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

    def _repr_html_(self):
        return result_html(self, title=f"LensResult: prediction {self.prediction_str!r}, target {self.target_str!r}")

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
    THAT residual (its own scale), then the unembedding (with its bias, GPT-J; and final softcapping, if
    the model has it);
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
    logits = m.project(_final_norm(m, states.reshape(-1, d)), "W_U")
    if m.W("b_U") is not None:  # GPT-J's lm_head bias
        logits = logits + m.W("b_U")
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
    if project_on not in ("embed", "unembed"):
        raise ValueError("project_on must be 'embed' or 'unembed'")
    sub = np.stack([r.attn_out[:, T - 1], r.mlp_out[:, T - 1]], 1)  # (L, 2, d)
    sub_top1 = np.argmax(m.project(sub.reshape(-1, d), "W_E" if project_on == "embed" else "W_U"), -1).reshape(L, 2)
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

