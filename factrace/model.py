"""``Model``: a loaded checkpoint with its tokenizer, and ``RunResult``: the residual stream taken apart."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import _core
from .errors import InputError
from .interventions import compile_interventions
from .io.config import ModelConfig
from .io.stored import StoredWeight, as_float32, concat

ALL_CAPTURES = ("embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "head_out", "attn", "z",
                "resid_final", "final_scale")
CAPTURE_NAMES = ALL_CAPTURES + ("q", "k", "v", "mlp_post", "k_cache", "v_cache", "norm_scale_attn", "q_cache")


@dataclass
class RunResult:
    """The outputs of one sequence's forward pass (T tokens, L layers, H heads, d = d_model).

    Always: ``ids`` (T,), ``logits`` (T, V) (or (1, V) with ``logits="last"``).
    With ``capture``: ``embed`` (T, d) what the embedding layer(s) put in the residual stream;
    ``resid_pre`` (L, T, d) input of each block; ``resid_mid`` (L, T, d) after the attention add (absent
    for parallel-residual blocks, GPT-NeoX / GPT-J, where attention and MLP both read ``resid_pre``);
    ``attn_out`` / ``mlp_out`` (L, T, d) what each sub-block adds; ``head_out`` (L, H, T, d) each head's
    share of ``attn_out`` without the output bias (Gemma: through its post-norm at the run's own scale);
    ``attn`` (L, H, T, T) attention probabilities; ``z`` (L, T, H, dh) each head's mixed values (the input
    of W_O; before factrace 0.2 this was (L, T, H*dh): ``z.reshape(L, T, -1)`` gives that);
    on request (``capture=[...]``): ``q`` (L, T, H, dh), ``k`` / ``v`` (L, T, KV, dh) (q and k before q/k
    norm and rotary), ``mlp_post`` (L, T, F) the MLP's hidden activations (the input of W_down),
    ``k_cache`` / ``v_cache`` (L, T, KV*dh) keys after norm and rotary, and values; ``q_cache`` (L, T, H*dh)
    queries after norm and rotary;
    ``resid_final`` (T, d) after the last block, before the final norm; ``final_scale`` (T,) the final
    norm's 1/sqrt(var + eps) per position.

    The parts add up: ``resid_final == embed + attn_out.sum(0) + mlp_out.sum(0)`` and
    ``attn_out[l] == head_out[l].sum(0) + b_O[l]`` (to float32 rounding), for sequential and parallel
    blocks alike (``resid_pre[l + 1] == resid_pre[l] + attn_out[l] + mlp_out[l]``).
    """

    ids: np.ndarray
    logits: np.ndarray | None = None
    embed: np.ndarray | None = None
    resid_pre: np.ndarray | None = None
    resid_mid: np.ndarray | None = None
    attn_out: np.ndarray | None = None
    mlp_out: np.ndarray | None = None
    head_out: np.ndarray | None = None
    attn: np.ndarray | None = None
    z: np.ndarray | None = None
    q: np.ndarray | None = None
    k: np.ndarray | None = None
    v: np.ndarray | None = None
    mlp_post: np.ndarray | None = None
    resid_final: np.ndarray | None = None
    final_scale: np.ndarray | None = None
    k_cache: np.ndarray | None = None
    v_cache: np.ndarray | None = None
    q_cache: np.ndarray | None = None
    norm_scale_attn: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def resid_post(self) -> np.ndarray | None:
        """(L, T, d) each block's output: resid_pre[1:] followed by resid_final."""
        if self.resid_pre is None or self.resid_final is None:
            return None
        return np.concatenate([self.resid_pre[1:], self.resid_final[None]], 0)

    @property
    def probs(self) -> np.ndarray:
        """Softmax of the logits (float64 for accuracy), shape like ``logits``."""
        x = self.logits.astype(np.float64)
        x = np.exp(x - x.max(-1, keepdims=True))
        return x / x.sum(-1, keepdims=True)


def _default_threads() -> int:
    for var in ("FACTRACE_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        v = os.environ.get(var, "")
        if v.strip().isdigit() and int(v) > 0:
            return int(v)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_THREADS = {"default": _default_threads()}
_MODELS = weakref.WeakSet()  # models that follow the default thread count (no set_num_threads of their own)


class Model:
    """A transformer loaded by :func:`factrace.load`, run by the C core.

    Attributes: ``config`` (:class:`ModelConfig`), ``tokenizer``, ``weights`` (dict of the weights in
    factrace's canonical names, see docs/ARCHITECTURE.md: norms, biases and learned positions as float32
    arrays; linear weights as float32 arrays or, loaded with ``weights="stored"`` (the default),
    :class:`~factrace.io.stored.StoredWeight` objects in the checkpoint's format — :meth:`W` gives any of
    them as float32), ``name``, ``threads`` (threads of a run, see :meth:`set_num_threads`).

    Example:
        >>> m = factrace.load("smollm2")                          # doctest: +SKIP
        >>> ids = m.encode("The Eiffel Tower is in")              # doctest: +SKIP
        >>> r = m.run(ids, capture=True)                          # doctest: +SKIP
        >>> r.attn_out.shape                                       # doctest: +SKIP
        (30, 7, 576)
    """

    def __init__(self, config: ModelConfig, weights: dict, tokenizer=None, name: str = "model", source=None,
                 threads: int | None = None):
        self.config = config
        self.weights = dict(weights)
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        core_weights = self._fuse()
        self._core = _core.Model(config.core_dict(), core_weights, threads=int(threads or _THREADS["default"]))
        if threads is None:
            _MODELS.add(self)

    def _fuse(self) -> dict:
        """The weights the C core gets: these, plus per layer q/k/v (and gate/up) fused into one matrix
        (``W_QKV``, ``W_gate_up``) when they share a format, so that a block makes fewer, larger products.
        The canonical ``W_Q`` / ``W_K`` / ``W_V`` (``W_gate`` / ``W_up``) become views of the fused matrix:
        no second copy."""
        W = self.weights
        out = dict(W)
        for i in range(self.config.n_layers):
            for parts, fused in ((("W_Q", "W_K", "W_V"), "W_QKV"), (("W_gate", "W_up"), "W_gate_up")):
                ws = [W.get(f"blocks.{i}.{p}") for p in parts]
                if any(w is None for w in ws) or len({type(w) for w in ws}) != 1:
                    continue
                if isinstance(ws[0], StoredWeight):
                    if len({w.type for w in ws}) != 1:
                        continue  # e.g. Q4_K_M: attn_v in Q6_K, attn_q/k in Q4_K
                    f = concat(ws)
                    views, r = [], 0
                    for w in ws:
                        views.append(f.rows(r, r + w.shape[0]))
                        r += w.shape[0]
                else:
                    f = np.concatenate(ws)
                    views = np.split(f, np.cumsum([w.shape[0] for w in ws])[:-1])
                for p, v in zip(parts, views):
                    W[f"blocks.{i}.{p}"] = out[f"blocks.{i}.{p}"] = v
                out[f"blocks.{i}.{fused}"] = f
                bs = [W.get(f"blocks.{i}.{p.replace('W_', 'b_')}") for p in parts]
                if any(b is not None for b in bs):
                    out[f"blocks.{i}.{fused.replace('W_', 'b_')}"] = np.concatenate(
                        [np.zeros(w.shape[0], np.float32) if b is None else b for w, b in zip(ws, bs)])
        return out

    @property
    def threads(self) -> int:
        """Threads a run of this model uses (the calling thread included)."""
        return self._core.threads

    def set_num_threads(self, n: int) -> None:
        """Run this model on ``n`` threads (the calling thread included); it then no longer follows
        :func:`factrace.set_num_threads`. Example: ``m.set_num_threads(1)`` next to other work."""
        self._core.set_threads(int(n))
        _MODELS.discard(self)

    def __repr__(self):
        c = self.config
        return (f"<factrace.Model {self.name!r} {c.arch} L={c.n_layers} d={c.d_model} H={c.n_heads} "
                f"KV={c.n_kv_heads} V={c.vocab_size}>")

    # -- tokenizer ---------------------------------------------------------------------------
    def _tok(self):
        if self.tokenizer is None:
            raise RuntimeError(f"{self.name}: this model has no tokenizer (no tokenizer.json); pass token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids (T,) int32; special tokens as the model's tokenizer adds them (BOS for Llama,
        none for GPT-2) unless ``add_special_tokens=False``."""
        return self._tok().encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids) -> str:
        """Text of a sequence of token ids."""
        return self._tok().decode(ids)

    def token_strings(self, ids) -> list:
        """One string per token id, for labels."""
        return self._tok().token_strings(ids)

    def W(self, name: str, layer: int | None = None) -> np.ndarray | None:
        """A weight by canonical name as float32, e.g. ``m.W("b_O", 3)`` (d,) or ``m.W("W_U")`` (V, d);
        None if absent. A weight kept as stored is dequantized on demand (each call; the values are the
        float32 loader's exactly): for a few rows use :meth:`W_rows`, for products :meth:`project`."""
        return as_float32(self.stored(name, layer))

    def stored(self, name: str, layer: int | None = None):
        """A weight as the model holds it: a float32 array or a :class:`~factrace.io.stored.StoredWeight`."""
        return self.weights.get(name if layer is None else f"blocks.{layer}.{name}")

    def W_rows(self, name: str, rows, layer: int | None = None) -> np.ndarray:
        """Rows of a matrix weight as float32, e.g. the embeddings of some tokens: ``m.W_rows("W_E", ids)``
        (len(ids), d); only those rows are dequantized."""
        w = self.stored(name, layer)
        rows = np.asarray(rows, np.int64)
        return w.float32(rows) if isinstance(w, StoredWeight) else w[rows]

    def project(self, x, name: str = "W_U", layer: int | None = None) -> np.ndarray:
        """``x (N, in) @ W^T`` (N, out) with a matrix weight in its stored format, through the C core's
        matrix-product layer on this model's threads. Example: logits of normed states,
        ``m.project(m.final_norm(r.resid_pre[5]))``."""
        w = self.stored(name, layer)
        x = np.ascontiguousarray(np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1]))
        out = _core.matmul(x, w, threads=self.threads)
        return out.reshape(np.shape(x)[:-1] + (out.shape[-1],))

    def final_norm(self, x) -> np.ndarray:
        """The final norm applied to residual vectors ``x`` (..., d), each with its own scale (float32,
        the C core's arithmetic): LayerNorm (x - mean) / sqrt(var + eps) * w + b, or RMSNorm
        w * (x / sqrt(mean(x^2) + eps)). Example: ``m.final_norm(r.resid_pre[5]) @ m.W("W_U").T``."""
        c = self.config
        x = np.asarray(x, np.float32)
        x64 = x.astype(np.float64)
        w, b = self.W("ln_f_w"), self.W("ln_f_b")
        if c.norm == "layernorm":
            mean = x64.mean(-1, keepdims=True).astype(np.float32)
            var = ((x64 - mean) ** 2).mean(-1, keepdims=True).astype(np.float32)
            y = ((x - mean) * (np.float32(1) / np.sqrt(var + np.float32(c.norm_eps)))) * w
            return y + b if b is not None else y
        ms = (x64 * x64).mean(-1, keepdims=True).astype(np.float32)
        return w * (x * (np.float32(1) / np.sqrt(ms + np.float32(c.norm_eps))))

    def b_O(self, layer: int) -> np.ndarray:
        """(d,) the attention output bias of ``layer`` as it reaches the residual stream (zeros if none)."""
        b = self.W("b_O", layer)
        return np.zeros(self.config.d_model, np.float32) if b is None else b

    # -- running -----------------------------------------------------------------------------
    def _as_batch(self, ids):
        single = False
        if isinstance(ids, str):
            ids = [self.encode(ids)]
            single = True
        elif isinstance(ids, np.ndarray) and ids.ndim == 1:
            ids, single = [ids], True
        elif isinstance(ids, np.ndarray) and ids.ndim == 2:
            ids = list(ids)
        elif isinstance(ids, (list, tuple)) and (len(ids) == 0 or isinstance(ids[0], (int, np.integer))):
            ids, single = [ids], True
        elif isinstance(ids, (list, tuple)):
            ids = [self.encode(x) if isinstance(x, str) else x for x in ids]
        else:
            raise InputError(f"cannot run on {type(ids).__name__}; pass token ids, a list of them, or a str")
        seqs = []
        V, n_ctx = self.config.vocab_size, self.config.n_ctx
        for i, s in enumerate(ids):
            a = np.asarray(s)
            if a.ndim != 1 or a.size == 0:
                raise InputError(f"sequence {i} is empty or not 1-D (shape {a.shape})")
            if not np.issubdtype(a.dtype, np.integer):
                raise InputError(f"sequence {i}: token ids must be integers, got {a.dtype}")
            if a.min() < 0 or a.max() >= V:
                bad = int(a[(a < 0) | (a >= V)][0])
                raise InputError(f"sequence {i}: token id {bad} is outside the vocabulary [0, {V})")
            if a.size > n_ctx:
                raise InputError(f"sequence {i} has {a.size} tokens; the model's context is {n_ctx}")
            seqs.append(a.astype(np.int32))
        if not seqs:
            raise InputError("empty batch")
        return seqs, single

    def run(self, ids, capture=False, interventions=(), logits: str | None = "all"):
        """Run the model on one sequence or a batch of sequences of any lengths.

        Args:
            ids: token ids (T,), a str (encoded with special tokens), or a list of sequences / strs.
            capture: False, True (every field of :class:`RunResult` except the K/V caches), or a list of
                names from ``embed, resid_pre, resid_mid, attn_out, mlp_out, head_out, attn, z, q, k, v,
                mlp_post, resid_final, final_scale, k_cache, v_cache, norm_scale_attn, q_cache`` (``resid_post``
                captures resid_pre and resid_final, of which it is a view). A parallel-residual model
                (``config.parallel``: GPT-NeoX / Pythia, GPT-J) has no ``resid_mid``: ``capture=True`` leaves
                it out and asking for it raises :class:`~factrace.InputError` (its equivalent for the MLP is
                ``resid_pre``; ``resid_pre + attn_out`` is the sum after the attention add).
            interventions: a list of :mod:`factrace.interventions` objects, applied in one pass.
            logits: ``"all"`` (T, V), ``"last"`` (1, V) or None.

        Returns: a :class:`RunResult` for one sequence, a list of them for a batch. All sequences of a
        batch go through the same matrix products in C (no padding).

        Example:
            >>> r = m.run(m.encode("The capital of France is"), capture=["attn_out", "mlp_out"])  # doctest: +SKIP
            >>> rs = m.run([ids_a, ids_b], logits="last")                                        # doctest: +SKIP
        """
        seqs, single = self._as_batch(ids)
        if capture is True:
            names = [n for n in ALL_CAPTURES if not (n == "resid_mid" and self.config.parallel)]
        elif not capture:
            names = []
        else:
            names = list(capture)
            if "resid_post" in names or "hidden" in names:  # a view: resid_pre[1:] + resid_final
                names = [n for n in names if n not in ("resid_post", "hidden")]
                names += [n for n in ("resid_pre", "resid_final") if n not in names]
            bad = [n for n in names if n not in CAPTURE_NAMES]
            if bad:
                raise ValueError(f"unknown capture {bad}; known: {', '.join(CAPTURE_NAMES)}")
            if "resid_mid" in names and self.config.parallel:
                raise InputError(f"{self.name}: {self.config.arch} has parallel-residual blocks (attention and MLP both "
                                 "read resid_pre), so there is no resid_mid to capture; use resid_pre + attn_out")
        c = self.config
        lens = np.array([len(s) for s in seqs], np.int32)
        N = int(lens.sum())
        L, d, H = c.n_layers, c.d_model, c.n_heads
        kvd = c.n_kv_heads * c.d_head
        shapes = {"embed": (N, d), "resid_pre": (L, N, d), "resid_mid": (L, N, d), "attn_out": (L, N, d),
                  "mlp_out": (L, N, d), "head_out": (L, H, N, d), "attn": (L, H, int((lens.astype(np.int64) ** 2).sum())),
                  "z": (L, N, H * c.d_head), "q": (L, N, H * c.d_head), "k": (L, N, kvd), "v": (L, N, kvd),
                  "mlp_post": (L, N, c.d_mlp), "resid_final": (N, d), "k_cache": (L, N, kvd), "v_cache": (L, N, kvd),
                  "norm_scale_attn": (L, N), "q_cache": (L, N, H * c.d_head)}
        cap = {n: np.empty(shapes[n], np.float32) for n in names if n in shapes}
        row0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
        kw = {}
        if logits == "all":
            cap["logits"] = np.empty((N, c.vocab_size), np.float32)
            lrows = None
        elif logits == "last":
            lrows = row0 + lens - 1
            cap["logits"] = np.empty((len(seqs), c.vocab_size), np.float32)
        elif logits is None:
            lrows = None
        else:
            raise ValueError("logits must be 'all', 'last' or None")
        if "final_scale" in names:
            cap["final_scale"] = np.empty(len(lrows) if lrows is not None else N, np.float32)
            if logits is None:
                lrows = None
        if lrows is not None:
            kw["logit_rows"] = lrows
        if interventions:
            kw.update(compile_interventions(interventions, lens, c, w_pos=self.W("W_pos") if c.learned_pos else None))
        self._core.forward(lens, ids=np.concatenate(seqs), capture=cap, **kw)
        return self._split(seqs, lens, row0, cap, logits, single)

    def generate(self, prompt, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop=None,
                 interventions=()):
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (a str, encoded with special tokens, or
        token ids) with a key/value cache in the C core (one new row per step).

        Args:
            do_sample: False (default): greedy, as transformers' ``generate(do_sample=False)``; True: sample
                from softmax(logits / ``temperature``) restricted to the ``top_k`` most likely tokens and to
                the smallest set of probability mass ``top_p`` (both optional), with NumPy's generator
                seeded by ``seed`` (reproducible).
            stop: a token id, a string, or a list of them: stop after generating one (default: the
                model's EOS token id(s)).
            interventions: applied at every step (see :mod:`factrace.generation`: absolute positions,
                negative ones counted from the end of the prompt, None = every position).

        Returns: :class:`factrace.generation.Generation` (``ids``, ``new_ids``, ``text``, ``stopped``).

        Example:
            >>> m.generate("The capital of Japan is", max_new_tokens=3).text          # doctest: +SKIP
            ' Tokyo.\n'
            >>> m.generate(p, 10, interventions=[factrace.add_direction("resid_post", u, 8.0, layers=6)])  # doctest: +SKIP
        """
        from .generation import generate

        return generate(self, prompt, max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop,
                        interventions)

    def _split(self, seqs, lens, row0, cap, logits, single):
        out = []
        aoff = 0
        for i, s in enumerate(seqs):
            T, r = int(lens[i]), int(row0[i])
            res = RunResult(ids=s)
            for n, a in cap.items():
                if n == "logits":
                    res.logits = a[r:r + T] if logits == "all" else a[i:i + 1]
                elif n == "final_scale":
                    res.final_scale = a[r:r + T] if logits != "last" else a[i:i + 1]
                elif n == "attn":
                    res.attn = a[:, :, aoff:aoff + T * T].reshape(a.shape[0], a.shape[1], T, T)
                elif n == "head_out":
                    res.head_out = a[:, :, r:r + T]
                elif n in ("embed", "resid_final"):
                    setattr(res, n, a[r:r + T])
                elif n in ("z", "q", "k", "v"):  # per head: (L, T, heads, dh)
                    setattr(res, n, a[:, r:r + T].reshape(a.shape[0], T, -1, self.config.d_head))
                else:
                    setattr(res, n, a[:, r:r + T])
            aoff += T * T
            out.append(res)
        return out[0] if single else out


def set_num_threads(n: int) -> None:
    """Set the number of threads factrace's runs use (default: the CPUs this process may run on, or
    ``FACTRACE_NUM_THREADS``): for every model that has no :meth:`Model.set_num_threads` of its own, loaded
    or to be loaded. Example: ``factrace.set_num_threads(1)`` beside other CPU-bound work."""
    n = int(n)
    if n < 1:
        raise ValueError("threads must be >= 1")
    _THREADS["default"] = n
    for m in list(_MODELS):
        m._core.set_threads(n)


def get_num_threads() -> int:
    """The thread count of :func:`set_num_threads` (the default of every model)."""
    return _THREADS["default"]
