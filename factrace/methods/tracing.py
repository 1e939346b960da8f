"""Causal tracing (Meng et al. 2022), severing, module knockout and the Gini coefficient, with the exact
semantics of ROME's reference code (see ../shared/METHODS.md, sections 1 and 2) and an engine that does
far less work than the reference:

* the clean run and the corrupted run (all noise samples at once) are computed once and reused;
* a restoration at (layer l, position t) recomputes only the layers from the first patched one on, and
  only positions t .. T-1: earlier positions' keys and values come from the corrupted run's cache;
* cells before the subject (where clean equals corrupted) cost nothing; so do last-layer hidden cells
  away from the last position;
* all cells of one layer and all noise samples go through the same matrix products (one C call);
* only the last position of each restored run is unembedded.

``engine="naive"`` runs every cell as a full forward pass through the public intervention API.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .. import interventions as iv
from .._optional import need
from ..model import Model
from ._common import _softmax_prob, result_html, token_embeddings
from ._reference import _prepare, check_reference, known_1000_subjects, torch_std

KINDS = ("hidden", "mlp", "attn")


def noise_level(m: Model, subjects=None, k: float = 3.0, reference=None, add_special_tokens=None) -> float:
    """``k`` times the standard deviation (one scalar over all elements) of the token embeddings of
    ``subjects``, each encoded on its own: ROME's ``s<k>`` noise level.

    Args:
        subjects: strings; default the 1,209 subjects of ROME's known_1000 dataset, duplicates kept, as both
            papers use them (shipped with factrace as ``factrace/data/known_1000_subjects.txt``, from ROME's
            ``known_1000.json``, MIT license; see :func:`factrace.methods._reference.known_1000_subjects`).
        k: the factor (3 for ``"s3"``).
        reference: ``None``: NumPy's ``.std()`` (ddof=0) in float64, subjects encoded without special tokens.
            ``"rome"``: ROME's ``collect_embedding_std``: each subject through ``make_inputs`` (the tokenizer's
            default special tokens, e.g. a BOS), and ``torch.Tensor.std()`` (unbiased, float32 mean and result).
            ``"caarm"``: the same std, subjects encoded without special tokens (CAARM's ``make_inputs``). The
            two std conventions differ by a relative ~1/(2n) (about 1e-7 on known_1000).
        add_special_tokens: overrides the preset's tokenization of the subjects.

    Example:
        >>> noise_level(m, ["Eiffel Tower", "Barack Obama"], k=3)     # doctest: +SKIP
        0.1384...
        >>> noise_level(m, reference="rome")              # SmolLM2-135M   # doctest: +SKIP
        0.34998...
    """
    reference = check_reference(reference)
    subjects = known_1000_subjects() if subjects is None else subjects
    special = (reference == "rome") if add_special_tokens is None else bool(add_special_tokens)
    rows = []
    for s in subjects:
        ids = m.encode(s, add_special_tokens=special)
        if len(ids):
            rows.append(token_embeddings(m, ids))
    if not rows:
        raise ValueError("noise_level: no subject produced any token")
    if reference is None:
        return float(k * np.concatenate(rows).astype(np.float64).std())
    return float(k) * torch_std(np.concatenate(rows))


@dataclass(frozen=True)
class _Noise:
    """A noise form of ROME's ``trace_with_patch``: ``"gauss"`` (``level * randn``), ``"uniform"`` (``level *
    uniform(-1, 1)``), ``"mvg"`` (``randn`` through the affine map ``z @ W.T + mean`` of a multivariate Gaussian
    matched to embedding statistics: ROME's ``make_generator_transform``), ``"t"`` (the same, each (sample,
    token) row scaled by ``t_factor``: ROME's ``collect_embedding_tdist``)."""

    form: str
    level: float = float("nan")
    mean: np.ndarray | None = None
    W: np.ndarray | None = None
    t_factor: np.ndarray | None = None
    label: str = ""

    def draw(self, rs, S, n, d) -> np.ndarray:
        """(S, n, d) float64 from the RandomState ``rs`` (one call, as ROME's ``prng(S, e - b, d)``)."""
        if self.form == "gauss":
            return rs.randn(S, n, d) * self.level
        if self.form == "uniform":
            return self.level * rs.uniform(-1, 1, (S, n, d))
        z = rs.randn(S, n, d) @ self.W.T + self.mean
        if self.form == "t":
            if S * n > len(self.t_factor):
                raise ValueError(f"t noise: ROME's fixed sample has {len(self.t_factor)} factors, fewer than "
                                 f"samples x subject tokens = {S * n}")
            z = self.t_factor[:S * n].reshape(S, n, 1) * z
        return z


def embedding_noise(m: Model, form: str = "m", texts=None, degrees: float = 3.0, reference=None,
                    add_special_tokens=None) -> "_Noise":
    """ROME's noise rules ``"m"`` (a multivariate Gaussian with the mean and covariance of token embeddings) and
    ``"t<k>"`` (a Student-t with k degrees of freedom and the same covariance), built from the token embeddings
    of ``texts`` (each encoded on its own; special tokens as :func:`noise_level`).

    ROME estimates the statistics over 1,000 samples of wikitext-103 (``get_embedding_cov``), which is not
    shipped: the default ``texts`` are known_1000's subjects. The affine map is ROME's: ``z @ W.T + mean`` with
    ``W = sqrt(s)[None, :] * V`` from the SVD of the unbiased covariance (so the added noise includes the mean,
    as in ROME); the t factors are ``sqrt((k - 2) / u)``, u from ``RandomState(2).chisquare(k, 1000)``. Pass the
    result as ``noise=`` to :func:`trace`, or use ``noise="m"`` / ``"t3"`` for the default texts.
    Singular-vector signs follow LAPACK, not torch, so the draws equal ROME's in distribution only."""
    reference = check_reference(reference)
    texts = known_1000_subjects() if texts is None else list(texts)
    special = (reference == "rome") if add_special_tokens is None else bool(add_special_tokens)
    rows = [token_embeddings(m, ids).astype(np.float64) for ids in (m.encode(t, add_special_tokens=special)
                                                                    for t in texts) if len(ids)]
    if not rows:
        raise ValueError("embedding_noise: no text produced any token")
    x = np.concatenate(rows)
    if len(x) < 2:
        raise ValueError("embedding_noise: need at least two tokens")
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / (len(x) - 1)
    _, s, vh = np.linalg.svd(cov)
    W = np.sqrt(s)[None, :] * vh.T
    if form == "m":
        return _Noise("mvg", mean=mean, W=W, label="m")
    if form == "t":
        if degrees <= 2:
            raise ValueError(f"t noise needs more than 2 degrees of freedom, got {degrees}")
        u = np.random.RandomState(2).chisquare(df=degrees, size=1000)
        return _Noise("t", mean=mean, W=W, t_factor=np.sqrt((degrees - 2) / u), label=f"t{degrees:g}")
    raise ValueError(f"form must be 'm' or 't', got {form!r}")


def _noise_value(m: Model, noise, noise_subjects, reference=None, noise_texts=None):
    """The noise of a trace: a float level (gaussian) or a :class:`_Noise`."""
    if isinstance(noise, _Noise):
        return noise
    if isinstance(noise, (int, float, np.floating)) and not isinstance(noise, bool):
        return float(noise)
    if isinstance(noise, str) and re.fullmatch(r"[stu][\d.]*|m", noise):
        cache = m.__dict__.setdefault("_trace_cache", {})
        code, num = noise[0], noise[1:]
        if code == "u":
            if not num:
                raise ValueError("uniform noise needs a level, e.g. 'u0.1'")
            return _Noise("uniform", float(num), label=noise)
        if code in ("m", "t"):
            texts = tuple(noise_texts) if noise_texts is not None else None
            key = ("embedding_noise", noise, hash(texts), reference)
            if key not in cache:
                cache[key] = embedding_noise(m, code, texts, float(num) if num else 3.0, reference)
            return cache[key]
        # "s<k>"; a bare "s" is k = 3 in factrace, k = 1 in the references (their parse_noise_rule)
        k = float(num) if num else (1.0 if reference else 3.0)
        subs = tuple(noise_subjects) if noise_subjects is not None else None
        key = ("noise", k, hash(subs), reference)
        if key not in cache:
            cache[key] = noise_level(m, subs, k, reference=reference)
        return cache[key]
    raise ValueError(f"noise must be a number, 's<k>' (e.g. 's3'), 'u<k>', 'm' or 't<k>', got {noise!r}")


def _default_subjects() -> tuple:
    """The default subjects of ``noise="s<k>"``: known_1000's (see :func:`noise_level`)."""
    return known_1000_subjects()


# ---------------------------------------------------------------------------------------------
# results

@dataclass
class TraceResult:
    """A causal trace of one fact.

    ``scores`` (T, L): probability of ``answer`` at the last position, averaged over the noise samples,
    with the cell's state restored; ``low_score`` (corrupted, nothing restored), ``high_score`` (clean);
    ``subject_range`` (b, e); ``answer`` token id; ``tokens`` strings; ``kind``; ``window``.
    Indirect effect of a cell: ``scores - low_score``.
    """

    scores: np.ndarray
    low_score: float
    high_score: float
    subject_range: tuple
    answer: int
    tokens: list
    kind: str
    window: int
    noise: float
    samples: int
    answer_str: str = ""
    prompt: str | None = None
    extra: dict = field(default_factory=dict)

    def _repr_html_(self):
        return result_html(self, title=f"TraceResult ({self.kind}): p({self.answer_str!r}) clean {self.high_score:.4f}, "
                                       f"corrupted {self.low_score:.4f}")

    @property
    def effect(self) -> np.ndarray:
        """(T, L) indirect effects ``scores - low_score``."""
        return self.scores - self.low_score

    def to_frame(self):
        """Tidy pandas DataFrame: one row per (position, layer) with token, in_subject, score, effect."""
        pd = need("pandas", "TraceResult.to_frame()")

        T, L = self.scores.shape
        b, e = self.subject_range
        pos, lay = np.meshgrid(np.arange(T), np.arange(L), indexing="ij")
        return pd.DataFrame({
            "kind": self.kind, "position": pos.ravel(), "layer": lay.ravel(),
            "token": np.repeat(np.array(self.tokens, dtype=object), L),
            "in_subject": ((pos >= b) & (pos < e)).ravel(),
            "score": self.scores.ravel(), "effect": self.effect.ravel(),
            "low_score": self.low_score, "high_score": self.high_score, "answer": self.answer_str,
        })

    def plot(self, ax=None, title=None):
        """The layer x token heatmap of ROME, subject tokens marked with '*'; returns the Figure."""
        matplotlib = need("matplotlib", "TraceResult.plot()")

        if ax is None:
            plt = need("matplotlib.pyplot", "TraceResult.plot()")

            fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * self.scores.shape[1] + 2), 0.32 * len(self.tokens) + 1.2),
                                   dpi=110)
        else:
            fig = ax.figure
        cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}.get(self.kind, "Purples")
        h = ax.pcolor(self.scores, cmap=cmap, vmin=self.low_score, shading="auto")
        ax.invert_yaxis()
        b, e = self.subject_range
        labels = [f"{t!r}*" if b <= i < e else repr(t) for i, t in enumerate(self.tokens)]
        ax.set_yticks(np.arange(len(labels)) + 0.5)
        ax.set_yticklabels(labels, fontsize=8)
        L = self.scores.shape[1]
        step = max(1, L // 10)
        ax.set_xticks(np.arange(0, L, step) + 0.5)
        ax.set_xticklabels(np.arange(0, L, step))
        what = {"hidden": "single restored layer", "mlp": f"MLP, window {self.window}",
                "attn": f"attention, window {self.window}"}[self.kind]
        ax.set_xlabel(f"layer ({what})")
        ax.set_title(title or "Impact of restoring state after corrupted input", fontsize=9)
        cb = fig.colorbar(h, ax=ax)
        cb.ax.set_title(f"p({self.answer_str.strip()})", fontsize=8)
        matplotlib.pyplot.close(fig)
        return fig



# ---------------------------------------------------------------------------------------------
# the engine

class _Tracer:
    """Clean and corrupted runs of one prompt, shared by every cell of every kind."""

    def __init__(self, m: Model, ids, span, samples, noise, seed, target, reference_noise_draws=1, replace=False,
                 additive_low=False, positions=None):
        self.m = m
        c = m.config
        self.ids = np.asarray(ids, np.int32)
        self.T = len(self.ids)
        self.b, self.e = span
        # the positions traced from the subject on (earlier cells equal low_score and cost nothing)
        self.ts = [t for t in _positions(positions, self.T, span) if t >= self.b]
        self.S = samples
        self.L, self.d = c.n_layers, c.d_model
        self.kvd = c.n_kv_heads * c.d_head
        # clean run
        self.clean = m.run(self.ids, capture=["resid_pre", "attn_out", "mlp_out", "resid_final"], logits="last")
        x = self.clean.logits[0].astype(np.float64)
        self.answer = int(np.argmax(x)) if target is None else int(target)
        if not 0 <= self.answer < c.vocab_size:
            raise ValueError(f"target token {self.answer} is outside the vocabulary")
        self.high = float(_softmax_prob(self.clean.logits, self.answer)[0])
        self.clean_post = np.concatenate([self.clean.resid_pre[1:], self.clean.resid_final[None]], 0)  # (L, T, d)
        # noise: one draw (samples, e - b, d) float64, reused by every cell (ROME: RandomState(seed).randn)
        spec = noise if isinstance(noise, _Noise) else _Noise("gauss", float(noise))
        self.spec = spec
        self.level = spec.level
        self.replace = bool(replace)
        rs = np.random.RandomState(seed)
        self.noise_draws = [spec.draw(rs, samples, self.e - self.b, self.d) for _ in range(reference_noise_draws)]
        self.emb = token_embeddings(m, self.ids)
        self.corrupt = [self._corrupted_run(nz) for nz in self.noise_draws]
        self.base = float(self.corrupt[0]["probs"].mean())  # corrupted run, nothing restored (every cell's floor)
        self.low = self.base
        if self.replace and additive_low:  # ROME/CAARM compute low_score without passing replace= on
            self.low = float(self._corrupted_run(self.noise_draws[0], replace=False)["probs"].mean())

    def noised_embeddings(self, nz, replace=None) -> np.ndarray:
        """(S, e-b, d) float32: the embedding rows with noise added in float64 then rounded (as torch's
        in-place add of a float64 tensor into a float32 one), or the noise itself with ``replace``."""
        if self.replace if replace is None else replace:
            return np.ascontiguousarray(nz, dtype=np.float32)
        return (self.emb[self.b:self.e][None].astype(np.float64) + nz).astype(np.float32)

    def _corrupted_run(self, nz, replace=None) -> dict:
        S, T, d, L = self.S, self.T, self.d, self.L
        N = S * T
        vals = self.noised_embeddings(nz, replace).reshape(-1, d)
        rows = (np.arange(S)[:, None] * T + np.arange(self.b, self.e)[None]).reshape(-1).astype(np.int64)
        n = len(rows)
        cap = {k: np.empty((L, N, d), np.float32) for k in ("resid_pre", "attn_out", "mlp_out")}
        cap["resid_final"] = np.empty((N, d), np.float32)
        cap["k_cache"] = np.empty((L, N, self.kvd), np.float32)
        cap["v_cache"] = np.empty((L, N, self.kvd), np.float32)
        cap["target_prob"] = np.empty(S, np.float64)
        last = (np.arange(S) * T + T - 1).astype(np.int64)
        self.m._core.forward(np.full(S, T, np.int32), ids=np.tile(self.ids, S), capture=cap, logit_rows=last,
                             logit_targets=np.full(S, self.answer, np.int64),
                             patch_site=np.zeros(n, np.int32), patch_layer=np.full(n, -1, np.int32),
                             patch_row=rows, patch_op=np.zeros(n, np.int32), patch_value=vals)
        post = np.concatenate([cap["resid_pre"][1:], cap["resid_final"][None]], 0)
        return dict(cap, post=post, probs=cap["target_prob"], noised=vals)

    # -- fast restoration of many cells in one C call --------------------------------------------
    def _stacked_inputs(self, start_layer, positions, first_rows_value=None, base=0) -> np.ndarray:
        """(R, d) the corrupted run's inputs of block ``start_layer`` stacked as _restore runs them (for
        each t in ``positions``, for each sample s, rows t .. T-1), row t set to ``first_rows_value[t_index]``
        ((n_t, d) or (n_t, S, d)) when given."""
        S, T = self.S, self.T
        cor = self.corrupt[base]
        src = cor["resid_pre"][start_layer] if start_layer < self.L else cor["resid_final"]
        parts = []
        for ti, t in enumerate(positions):
            for s in range(S):
                x = src[s * T + t: s * T + T].copy()
                if first_rows_value is not None:
                    fv = first_rows_value[ti]
                    x[0] = fv[s] if fv.ndim == 2 else fv
                parts.append(x)
        return np.concatenate(parts)

    def _restore(self, start_layer, positions, first_rows_value=None, base=0, patches=None, end_layer=None,
                 inputs=None, capture_mid=False):
        """Run, for every position t in ``positions`` and every sample s, the corrupted sequence through
        blocks ``start_layer`` .. ``end_layer``-1 at positions t .. T-1 only (earlier keys and values
        come from the corrupted run's cache), with row t of the input replaced by
        ``first_rows_value[t_index]`` ((n_t, d) or (n_t, S, d)) and ``patches(t_index, s) -> [(site,
        layer, value)]`` applied to row t. ``inputs`` (R, d) replaces the corrupted input rows (the same
        stacked layout: for each t, for each s, rows t .. T-1).
        Returns (len(positions),) mean answer probabilities, or with ``end_layer < L`` the output rows
        (R, d), and with ``capture_mid`` also block ``start_layer``'s resid_mid rows (R, d): its input plus
        its attention output, the very float32 sum the C core forms (for a parallel block, which has no
        resid_mid, the sum its MLP output is added to)."""
        S, T, L = self.S, self.T, self.L
        end_layer = L if end_layer is None else end_layer
        cor = self.corrupt[base]
        lens, starts, prows, last = [], [], [], []
        row = 0
        p_site, p_layer, p_row, p_val = [], [], [], []
        for ti, t in enumerate(positions):
            for s in range(S):
                lens.append(T - t)
                starts.append(t)
                prows.append(s * T)
                if patches is not None:
                    for site, layer, value in patches(ti, s):
                        p_site.append(site)
                        p_layer.append(layer)
                        p_row.append(row)
                        p_val.append(value)
                row += T - t
                last.append(row - 1)
        kw = {}
        if p_site:
            kw = dict(patch_site=np.array(p_site, np.int32), patch_layer=np.array(p_layer, np.int32),
                      patch_row=np.array(p_row, np.int64), patch_op=np.zeros(len(p_site), np.int32),
                      patch_value=np.ascontiguousarray(np.stack(p_val), dtype=np.float32))
        x_in = self._stacked_inputs(start_layer, positions, first_rows_value, base) if inputs is None else inputs
        if end_layer < L:
            out = np.empty((row, self.d), np.float32)
            cap, lrows = {"resid_final": out}, None
            if capture_mid:
                cap["attn_out"] = np.empty((L, row, self.d), np.float32)
        else:
            out = np.empty(len(last), np.float64)
            cap, lrows = {"target_prob": out}, np.array(last, np.int64)
            kw["logit_targets"] = np.full(len(last), self.answer, np.int64)
        self.m._core.forward(np.array(lens, np.int32), resid_in=x_in, start_layer=start_layer, end_layer=end_layer,
                             seq_starts=np.array(starts, np.int32), prefix_k=cor["k_cache"], prefix_v=cor["v_cache"],
                             prefix_rows=np.array(prows, np.int64), capture=cap, logit_rows=lrows, **kw)
        if end_layer < L:
            return (out, x_in + cap["attn_out"][start_layer]) if capture_mid else out
        return out.reshape(len(positions), S).mean(1)

    def empty_scores(self) -> np.ndarray:
        """(T, L): the corrupted run's score before the subject (restoring there changes nothing), NaN on the rows from
        the subject on that are not traced (``self.ts``: the positions asked for)."""
        scores = np.full((self.T, self.L), self.base)
        scores[[t for t in range(self.b, self.T) if t not in set(self.ts)]] = np.nan
        return scores

    def hidden_scores(self) -> np.ndarray:
        T, L, ts = self.T, self.L, self.ts
        scores = self.empty_scores()
        if not ts:
            return scores
        for l in range(L - 1):
            scores[ts, l] = self._restore(l + 1, ts, first_rows_value=self.clean_post[l, ts])
        # last layer: only the last position's final state matters; restoring it gives the clean run
        if T - 1 in ts:
            scores[T - 1, L - 1] = self.high
        return scores

    def _row_step(self, layer, x, attn_value):
        """Row t of every (t, s) alone through block ``layer``, its attention output set to
        ``attn_value[t_index]``; the keys and values of positions < t come from the corrupted cache.
        x (n_t, S, d) block inputs -> (n_t, S, d) block outputs. (The rows after t need no step: with only
        row t's attention output restored, their block ``layer`` is the corrupted run's.)"""
        n_t, S, d = x.shape
        R = n_t * S
        cor = self.corrupt[0]
        out = np.empty((R, d), np.float32)
        self.m._core.forward(np.ones(R, np.int32), resid_in=np.ascontiguousarray(x.reshape(R, d), dtype=np.float32),
                             start_layer=layer, end_layer=layer + 1,
                             seq_starts=np.repeat(np.array(self.ts), S).astype(np.int32),
                             prefix_k=cor["k_cache"], prefix_v=cor["v_cache"],
                             prefix_rows=np.tile(np.arange(S) * self.T, n_t).astype(np.int64),
                             capture={"resid_final": out},
                             patch_site=np.full(R, iv.SITES["attn_out"][0], np.int32),
                             patch_layer=np.full(R, layer, np.int32), patch_row=np.arange(R, dtype=np.int64),
                             patch_op=np.zeros(R, np.int32),
                             patch_value=np.ascontiguousarray(np.repeat(attn_value, S, axis=0), dtype=np.float32))
        return out.reshape(n_t, S, d)

    def _first_rows(self, positions) -> np.ndarray:
        """Indices of row t of every (t, s) block in _restore's stacked layout."""
        lens = np.repeat([self.T - t for t in positions], self.S)
        return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)

    def window_scores(self, kind: str, window: int) -> np.ndarray:
        """Cells (t, l) restore the ``kind`` output at position t in layers lo(l) .. hi(l)-1. Savings on
        top of _restore:
        (1) entry: restoring block lo's output at row t changes only row t in block lo (the later rows'
            keys, values and queries there come from unchanged inputs), so every run starts at lo + 1
            with row t's block-lo output precomputed (MLP: corrupted resid_mid + clean mlp_out, resid_mid
            being resid_pre + attn_out as the C core adds them, also for parallel blocks, which have no
            resid_mid of their own; attention: a one-row step, _row_step);
        (2) a trunk: the cells whose window starts at layer 0 share their restored layers. The trunk
            advances with restorations; where a group of cells' windows end at layer h they branch off
            and run to the logits unrestored, and the trunk's block h is taken from the branch's (it
            differs only at row t, which is set from the branch's resid_mid, or stepped alone)."""
        T, L, S, d = self.T, self.L, self.S, self.d
        site = iv.SITES[kind + "_out"][0]
        clean = self.clean.mlp_out if kind == "mlp" else self.clean.attn_out
        cor = self.corrupt[0]
        scores = self.empty_scores()
        ts = self.ts
        if not ts:
            return scores
        first_idx = self._first_rows(ts)
        lo_of = lambda l: max(0, l - window // 2)  # noqa: E731
        hi_of = lambda l: min(L, l - (-window // 2))  # noqa: E731

        def block_out_row_t(lo, x_t):
            """(n_t, S, d) row t's output of block lo with the kind's output restored; x_t its inputs."""
            if kind == "mlp":
                pre, att = (cor[k][lo].reshape(S, T, d)[:, ts].transpose(1, 0, 2) for k in ("resid_pre", "attn_out"))
                return (pre + att) + clean[lo, ts][:, None]  # (n_t, S, d): the float32 adds of C
            return self._row_step(lo, x_t, clean[lo, ts])

        def corrupted_row_t(layer):
            return cor["resid_pre"][layer].reshape(S, T, d)[:, ts].transpose(1, 0, 2)

        def patch_fn(layers):
            return lambda ti, s: [(site, j, clean[j, ts[ti]]) for j in layers]

        # (2) the trunk of the cells with lo == 0, grouped by where their windows end; X holds the trunk's
        # stacked inputs of block cur
        ends = sorted({hi_of(l) for l in range(L) if lo_of(l) == 0})
        cells_ending = {h: [l for l in range(L) if lo_of(l) == 0 and hi_of(l) == h] for h in ends}
        X, cur = self._stacked_inputs(1, ts, block_out_row_t(0, corrupted_row_t(0))), 1
        for i, h in enumerate(ends):
            if h == L:  # the last cells restore through the top: finish the trunk
                p = self._restore(cur, ts, inputs=X, patches=patch_fn(range(cur, L)))
            else:
                if h > cur:
                    X = self._restore(cur, ts, inputs=X, patches=patch_fn(range(cur, h)), end_layer=h)
                    cur = h
                if i == len(ends) - 1 or h + 1 == L:  # nobody continues past block h: branch straight
                    p = self._restore(h, ts, inputs=X)        # to the logits (the trunk keeps X)
                else:
                    Xb, mid = self._restore(h, ts, inputs=X, end_layer=h + 1, capture_mid=True)
                    p = self._restore(h + 1, ts, inputs=Xb)
                    # the trunk through block h = the branch's, with row t restored
                    if kind == "mlp":
                        row_t = mid[first_idx] + np.repeat(clean[h, ts], S, axis=0)
                    else:
                        row_t = self._row_step(h, X[first_idx].reshape(len(ts), S, d), clean[h, ts]).reshape(-1, d)
                    X = Xb
                    X[first_idx] = row_t
                    cur = h + 1
            for l in cells_ending[h]:
                scores[ts, l] = p

        # (1) every other cell from its own entry
        for l in range(L):
            lo = lo_of(l)
            if lo == 0:
                continue
            first = block_out_row_t(lo, corrupted_row_t(lo))
            scores[ts, l] = self._restore(lo + 1, ts, first_rows_value=first, patches=patch_fn(range(lo + 1, hi_of(l))))
        return scores

    # -- naive: every cell a full forward pass of the S corrupted rows ----------------------------
    def naive_scores(self, kind: str, window: int, positions=None) -> np.ndarray:
        T, L, S = self.T, self.L, self.S
        noised = self.corrupt[0]["noised"].reshape(S, self.e - self.b, self.d)
        noise_iv = [iv.set_values("embed", noised[s], positions=range(self.b, self.e), seq=s) for s in range(S)]
        batch = [self.ids] * S
        scores = np.full((T, L), np.nan)
        for t in _positions(positions, T, (self.b, self.e)):
            for l in range(L):
                if kind == "hidden":
                    rest = [iv.set_values("resid_post", self.clean_post[l, t], layers=l, positions=t)]
                else:
                    lo, hi = max(0, l - window // 2), min(L, l - (-window // 2))
                    clean = self.clean.mlp_out if kind == "mlp" else self.clean.attn_out
                    rest = [iv.set_values(kind + "_out", clean[lo:hi, t][:, None], layers=range(lo, hi), positions=t)]
                rs = self.m.run(batch, interventions=noise_iv + rest, logits="last")
                scores[t, l] = np.mean([_softmax_prob(r.logits, self.answer)[0] for r in rs])
        return scores



def _positions(positions, T: int, span) -> list:
    """The token positions a trace computes, sorted: all (None), ``"last_subject"`` (e - 1, the one row
    the cross-architecture study reads), or a list of positions (negative ones count from the end)."""
    if positions is None:
        return list(range(T))
    if isinstance(positions, str):
        if positions != "last_subject":
            raise ValueError(f"positions must be None, 'last_subject' or a list of positions, got {positions!r}")
        return [span[1] - 1]
    out = set()
    for p in np.atleast_1d(positions):
        if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, np.integer)) or not -T <= int(p) < T:
            raise ValueError(f"position {p!r} is not a token position of a {T}-token prompt")
        out.add(int(p) % T)
    return sorted(out)


def trace(m: Model, prompt, subject, kind: str = "hidden", window: int = 10, samples: int = 10, noise="s3",
          seed: int = 1, target=None, engine: str = "fast", add_special_tokens: bool | None = None,
          noise_subjects=None, positions=None, replace: bool = False, reference=None, noise_texts=None,
          verify_top=None) -> TraceResult:
    """Causal trace of one fact (ROME): restore each (token, layer) state of a corrupted run.

    Args:
        m: a loaded :class:`factrace.Model`.
        prompt: str, or token ids (T,).
        subject: the subject string (its span is the tokens overlapping its first occurrence, via the
            tokenizer's offsets) or a ``(b, e)`` token span.
        kind: ``"hidden"`` (block output at one layer), ``"mlp"`` or ``"attn"`` (sub-layer outputs at
            one position over the window of layers ``max(0, l - w//2) .. min(L, l - (-w//2)) - 1``).
        window: w, default 10 (layers l-5 .. l+4).
        samples: noise samples (corrupted rows), default 10.
        noise: ROME's noise rules: a number (``number * randn``), ``"s<k>"``: k x the std of subject token
            embeddings (default ``"s3"``, as in the published figures; see :func:`noise_level`; the subjects
            are ``noise_subjects`` if given, else known_1000's 1,209 subjects, shipped with factrace),
            ``"u<k>"``: ``k * uniform(-1, 1)``, ``"m"``: a multivariate Gaussian matched to embedding
            statistics, ``"t<k>"``: a Student-t with k degrees of freedom (both from ``noise_texts``, see
            :func:`embedding_noise`), or an :func:`embedding_noise` object.
        seed: seed of ``numpy.random.RandomState(seed)``, default 1; its one draw (samples, e - b, d) serves
            every cell and ``low_score``, so a trace is deterministic.
        target: answer token id; default: the clean run's argmax next token.
        engine: ``"fast"`` (default), ``"naive"`` (every cell a full forward pass; for tests) or ``"atp"``
            (every cell estimated from one backward pass of the corrupted runs, attribution patching:
            see :func:`factrace.methods.attribution_patching.atp_trace`; ``verify_top=k`` then runs the exact
            engine on the k most promising cells; ``extra`` holds the estimates).
        add_special_tokens: tokenize a str prompt with the model's special tokens; default (None): the
            preset's (True for ``None`` and ``"rome"``, False for ``"caarm"``).
        positions: the rows of the grid to compute: None (default, every token: ROME's heatmaps and six
            category averages need them all), ``"last_subject"`` (only e - 1: what the cross-architecture
            study reads; about T - b times less work), or a list of positions. Rows not computed are NaN
            (rows before the subject are the corrupted run's score whatever is asked: restoring there changes
            nothing).
        replace: replace the subject's embeddings by the noise instead of adding it (ROME's ``--replace``).
        noise_texts: the texts of ``"m"`` / ``"t<k>"`` (default known_1000's subjects; ROME uses wikitext-103).
        reference: ``None`` (factrace's definitions), ``"rome"`` or ``"caarm"``. The presets change:
            the subject span (their ``find_token_range``: tokens decoded one by one and joined, see
            :func:`factrace.methods._reference.decoded_span`, instead of the tokenizer's offsets); the ``s<k>``
            level (torch's unbiased float32 std; ROME encodes the subjects with special tokens, CAARM without;
            a bare ``"s"`` means k = 1); the default tokenization (CAARM: no special tokens); and with
            ``replace=True``, ``low_score`` comes from ADDING the noise (their ``calculate_hidden_flow`` does
            not pass ``replace`` on to the ``low_score`` run), while factrace's default reports the replaced
            run's. Cells, windows, scores and the noise draw are the same in every preset.

    Returns: :class:`TraceResult` with ``scores`` (T, L); ``extra`` records the preset, noise form and
    ``replace``.

    Example:
        >>> r = factrace.trace(m, "The Eiffel Tower is located in the city of", "The Eiffel Tower")  # doctest: +SKIP
        >>> r.scores.shape, r.answer_str                                                         # doctest: +SKIP
        ((11, 30), ' Paris')
        >>> fig = r.plot()                                                                      # doctest: +SKIP
        >>> r = factrace.trace(m, prompt, subject, reference="rome")   # ROME's numbers   # doctest: +SKIP
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return trace_all(m, prompt, subject, kinds=(kind,), window=window, samples=samples, noise=noise, seed=seed,
                     target=target, engine=engine, add_special_tokens=add_special_tokens,
                     noise_subjects=noise_subjects, positions=positions, replace=replace, reference=reference,
                     noise_texts=noise_texts, verify_top=verify_top)[kind]


def _result(m, tr: "_Tracer", kind, window, engine, text, reference=None, positions=None) -> TraceResult:
    if engine == "naive":
        scores = tr.naive_scores(kind, window, positions)
    elif kind == "hidden":
        scores = tr.hidden_scores()
    else:
        scores = tr.window_scores(kind, window)
    toks = m.token_strings(tr.ids) if m.tokenizer is not None else [str(i) for i in tr.ids]
    ans = m.decode([tr.answer]) if m.tokenizer is not None else str(tr.answer)
    return TraceResult(scores=scores, low_score=tr.low, high_score=tr.high, subject_range=(tr.b, tr.e),
                       answer=tr.answer, tokens=toks, kind=kind, window=window, noise=tr.level,
                       samples=tr.S, answer_str=ans, prompt=text,
                       extra=dict(reference=reference, noise_form=tr.spec.label or tr.spec.form, replace=tr.replace))


def trace_all(m: Model, prompt, subject, kinds=KINDS, window: int = 10, samples: int = 10, noise="s3", seed: int = 1,
              target=None, engine: str = "fast", add_special_tokens: bool | None = None, noise_subjects=None,
              positions=None, replace: bool = False, reference=None, noise_texts=None, verify_top=None) -> dict:
    """Every kind of :func:`trace` for one fact, sharing the clean and corrupted runs.

    Arguments, defaults and presets (``reference=``) as :func:`trace` (``kinds`` a subset of ("hidden",
    "mlp", "attn"); ``positions`` the rows computed, e.g. ``"last_subject"``; ``engine="atp"`` with
    ``verify_top``). Returns {kind: TraceResult}, each with ``scores`` (T, L), and the same numbers as separate
    :func:`trace` calls with the same seed. This is the fast way to get the three ROME heatmaps of a fact.

    Example:
        >>> res = factrace.trace_all(m, "The Eiffel Tower is located in the city of",
        ...                          "The Eiffel Tower")                      # doctest: +SKIP
        >>> res["mlp"].scores.shape, res["attn"].window                       # doctest: +SKIP
        ((10, 30), 10)
    """
    reference = check_reference(reference)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds}")
    if engine == "atp":
        from .attribution_patching import atp_trace

        return atp_trace(m, prompt, subject, kinds, window, samples, noise, seed, target, add_special_tokens,
                         noise_subjects, positions, verify_top, replace=replace, reference=reference,
                         noise_texts=noise_texts)
    if engine not in ("fast", "naive"):
        raise ValueError("engine must be 'fast', 'naive' or 'atp'")
    if samples < 1 or window < 1:
        raise ValueError("samples and window must be >= 1")
    ids, span, text = _prepare(m, prompt, subject, add_special_tokens, reference)
    level = _noise_value(m, noise, noise_subjects, reference, noise_texts)
    tr = _Tracer(m, ids, span, samples, level, seed, target, replace=replace,
                 additive_low=reference is not None, positions=positions)
    return {k: _result(m, tr, k, window, engine, text, reference, positions) for k in kinds}
