"""Text generation with a key/value cache in the C core (:meth:`factrace.Model.generate`), under interventions.

The prompt runs once, capturing every layer's keys and values; each new token is then one row through the
C forward pass whose earlier keys and values come from that cache (``seq_starts`` / ``prefix_k`` /
``prefix_v``), and its own keys and values are appended. Greedy decoding equals transformers'
``generate(do_sample=False)``; sampling (temperature, top-k, top-p) draws from a seeded NumPy generator.

Interventions apply at every step, at absolute positions of the growing sequence: position 0 is the
first prompt token, negative positions count from the end of the PROMPT (-1: its last token), and
``positions=None`` means every position, prompt and generated tokens alike (steering). An intervention
whose value has a positions axis applies, at a generated position, the value of that position.

Example:
    >>> out = m.generate("The Eiffel Tower is located in the city of", max_new_tokens=5)   # doctest: +SKIP
    >>> out.text                                                                           # doctest: +SKIP
    ' Paris, France. The'
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import interventions as iv_mod
from .errors import InputError


@dataclass
class Generation:
    """The result of :meth:`Model.generate`: ``ids`` (T0 + n,) prompt and new tokens, ``new_ids`` (n,),
    ``text`` (the decoded new tokens), ``prompt_len`` T0, ``stopped`` ("eos", "stop", "length")."""

    ids: np.ndarray
    new_ids: np.ndarray
    text: str
    prompt_len: int
    stopped: str

    def _repr_html_(self):
        import html

        return f"<pre>{html.escape(self.text)}</pre><small>{len(self.new_ids)} new tokens, stopped: {self.stopped}</small>"


def _restrict(iv, lo: int, hi: int, T0: int, cfg):
    """The part of intervention ``iv`` that acts at absolute positions lo .. hi-1, as an intervention on a
    run of those rows (positions re-based to lo; values with a positions axis sliced), or None. Negative
    positions (and attention keys) count from the end of the prompt (T0)."""
    if iv.kind == "block":
        qs = [q % T0 if q < 0 else q for q in iv.queries]
        keep = [q - lo for q in qs if lo <= q < hi]
        keys = tuple(k for k in (k % T0 if k < 0 else k for k in iv.keys) if k < hi)
        if not keep or not keys:
            return None
        return replace(iv, queries=tuple(keep), keys=keys)
    if iv.positions is None:
        pos, js = list(range(lo, hi)), None
    else:
        absn = [p % T0 if p < 0 else p for p in iv.positions]
        js = [j for j, p in enumerate(absn) if lo <= p < hi]
        if not js:
            return None
        pos = [absn[j] for j in js]
    v, keys = iv.value, iv.keys
    if v is not None and js is not None:
        n_lay = 1 if iv.site == "embed" else (len(iv.layers) if iv.layers is not None else cfg.n_layers)
        try:
            P = max(1, len(iv.keys)) if iv.keys is not None else 1
            full = iv_mod.value_shape(iv, cfg, P, n_lay, len(iv.positions))
            if iv.site == "attn" and iv.keys is None:
                full = full[:-1] + (v.shape[-1] if v.ndim else 1,)
            v = np.take(np.broadcast_to(v, full), js, axis=0 if iv.site == "embed" else 1)
        except ValueError:
            pass  # not broadcastable here: compile_interventions reports it
    if iv.site == "attn" and keys is not None:  # absolute key positions; keys not yet computed are dropped
        ka = [k % T0 if k < 0 else k for k in keys]
        kj = [j for j, k in enumerate(ka) if k < hi]
        if not kj:
            return None
        if v is not None and v.ndim and v.shape[-1] == len(ka) and len(kj) < len(ka):
            v = np.take(v, kj, axis=-1)
        keys = tuple(ka[j] for j in kj)
    return replace(iv, positions=tuple(p - lo for p in pos), value=v, keys=keys)


def _sample(logits: np.ndarray, rng, temperature, top_k, top_p) -> int:
    x = logits.astype(np.float64) / max(float(temperature), 1e-8)
    if top_k is not None and 0 < top_k < x.size:
        cut = np.partition(x, -top_k)[-top_k]
        x = np.where(x < cut, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p is not None and 0 < top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(p, bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate(m, prompt, max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None, stop=None,
             interventions=()) -> Generation:
    """See :meth:`factrace.Model.generate`."""
    ids = m.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt, np.int32).reshape(-1)
    T0 = len(ids)
    if T0 == 0:
        raise InputError("generate: empty prompt")
    c = m.config
    n_new = int(max_new_tokens)
    if n_new < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if T0 + n_new > c.n_ctx:
        raise InputError(f"generate: {T0} prompt tokens + {n_new} new ones exceed the model's context of {c.n_ctx}")
    stops_ids, stops_str = set(), []
    for s in [] if stop is None else [stop] if isinstance(stop, (str, int, np.integer)) else list(stop):
        if isinstance(s, str):
            stops_str.append(s)
        else:
            stops_ids.add(int(s))
    eos = c.eos_token_id
    if stop is None and eos is not None:
        stops_ids |= set(eos if isinstance(eos, list) else [eos])
    rng = np.random.default_rng(seed)
    L, kvd = c.n_layers, c.n_kv_heads * c.d_head
    K = np.zeros((L, T0 + n_new, kvd), np.float32)
    V = np.zeros_like(K)
    ivs = list(interventions)
    w_pos = m.W("W_pos") if c.learned_pos else None
    prompt_ivs = [x for x in (_restrict(iv, 0, T0, T0, c) for iv in ivs) if x is not None]
    kw = iv_mod.compile_interventions(prompt_ivs, [T0], c, w_pos=w_pos) if prompt_ivs else {}
    cap = {"k_cache": np.empty((L, T0, kvd), np.float32), "v_cache": np.empty((L, T0, kvd), np.float32),
           "logits": np.empty((1, c.vocab_size), np.float32)}
    m._core.forward(np.array([T0], np.int32), ids=np.asarray(ids, np.int32), capture=cap,
                    logit_rows=np.array([T0 - 1], np.int64), **kw)
    K[:, :T0], V[:, :T0] = cap["k_cache"], cap["v_cache"]
    out, stopped, logits = list(map(int, ids)), "length", cap["logits"][0]
    for step in range(n_new):
        tok = _sample(logits, rng, temperature, top_k, top_p) if do_sample else int(np.argmax(logits))
        out.append(tok)
        if tok in stops_ids:
            stopped = "eos" if stop is None else "stop"
            break
        if stops_str and m.tokenizer is not None and any(m.decode(out[T0:]).endswith(s) for s in stops_str):
            stopped = "stop"
            break
        if step == n_new - 1:
            break
        t = len(out) - 1  # absolute position of the new token
        step_ivs = [x for x in (_restrict(iv, t, t + 1, T0, c) for iv in ivs) if x is not None]
        kw = iv_mod.compile_interventions(step_ivs, [1], c, starts=[t], w_pos=w_pos) if step_ivs else {}
        cap = {"k_cache": np.empty((L, 1, kvd), np.float32), "v_cache": np.empty((L, 1, kvd), np.float32),
               "logits": np.empty((1, c.vocab_size), np.float32)}
        m._core.forward(np.array([1], np.int32), ids=np.array([tok], np.int32), seq_starts=np.array([t], np.int32),
                        prefix_k=K, prefix_v=V, prefix_rows=np.array([0], np.int64), capture=cap, **kw)
        K[:, t], V[:, t] = cap["k_cache"][:, 0], cap["v_cache"][:, 0]
        logits = cap["logits"][0]
    arr = np.array(out, np.int32)
    text = m.decode(arr[T0:]) if m.tokenizer is not None else ""
    return Generation(ids=arr, new_ids=arr[T0:], text=text, prompt_len=T0, stopped=stopped)
