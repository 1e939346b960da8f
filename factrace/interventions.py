"""Interventions on the C forward pass, composable in one run.

Sites (what a patch acts on, per sequence position):
    ``"embed"``       the token-embedding output, before learned positions are added (GPT-2) and
                      after Gemma's sqrt(d) scaling: where causal tracing adds its noise. No layers.
    ``"attn_out"``    what a block's attention adds to the residual stream (Gemma: after its post-norm).
    ``"mlp_out"``     what a block's MLP adds to the residual stream.
    ``"resid_post"``  a block's output, the next block's input (alias ``"hidden"``).

Operations: :func:`add`, :func:`set_values` (restore given values), :func:`freeze` (hold at the values
of another run, for severing), :func:`zero` (knockout), and :func:`block_attention` (remove attention
edges from query positions to key positions before the softmax; the remaining weights renormalise).

Example:
    >>> import numpy as np, factrace as ft
    >>> clean = m.run(ids, capture=["mlp_out"])                                    # doctest: +SKIP
    >>> noisy = m.run(ids, interventions=[ft.add("embed", noise, positions=[1, 2, 3])])  # doctest: +SKIP
    >>> fixed = m.run(ids, interventions=[                                          # doctest: +SKIP
    ...     ft.add("embed", noise, positions=[1, 2, 3]),
    ...     ft.set_values("mlp_out", clean.mlp_out[4:6, [3]], layers=[4, 5], positions=[3]),
    ...     ft.zero("attn_out", layers=range(8, 12)),
    ...     ft.block_attention(layers=range(0, 9), queries=[-1], keys=[1, 2, 3])])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SITES = {"embed": 0, "attn_out": 1, "mlp_out": 2, "resid_post": 3, "hidden": 3}
OPS = {"set": 0, "add": 1, "zero": 2}


@dataclass(frozen=True)
class Intervention:
    """One intervention; build it with :func:`add`, :func:`set_values`, :func:`freeze`, :func:`zero` or
    :func:`block_attention`. ``seq`` picks one sequence of a batch (None: every sequence)."""

    kind: str                      # "patch" or "block"
    site: str | None = None
    op: str | None = None
    layers: tuple | None = None    # None: every layer
    positions: tuple | None = None  # None: every position; negative values count from the end
    value: np.ndarray | None = None
    queries: tuple | None = None
    keys: tuple | None = None
    seq: int | None = None


def _tuple(x):
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return (int(x),)
    out = []
    for v in x:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"layers and positions must be integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


def _site(site):
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
    return "resid_post" if site == "hidden" else site


def add(site: str, value, positions=None, layers=None, seq=None) -> Intervention:
    """Add ``value`` at a site. ``value`` broadcasts to (n_layers, n_positions, d) — for ``"embed"``,
    to (n_positions, d). Example: ``add("embed", noise (3, d), positions=[1, 2, 3])``."""
    return Intervention("patch", _site(site), "add", _tuple(layers), _tuple(positions),
                        np.asarray(value, dtype=np.float32), seq=seq)


def set_values(site: str, value, positions=None, layers=None, seq=None) -> Intervention:
    """Set a site to ``value`` (restoration). ``value`` broadcasts to (n_layers, n_positions, d).
    Example: ``set_values("resid_post", clean.resid_post[5, [4]], layers=5, positions=4)``."""
    return Intervention("patch", _site(site), "set", _tuple(layers), _tuple(positions),
                        np.asarray(value, dtype=np.float32), seq=seq)


def zero(site: str, layers=None, positions=None, seq=None) -> Intervention:
    """Zero a site (knockout). Default: every layer and position.
    Example: ``zero("mlp_out", layers=range(3, 9))``."""
    return Intervention("patch", _site(site), "zero", _tuple(layers), _tuple(positions), None, seq=seq)


def freeze(site: str, source, layers=None, positions=None, seq=None) -> Intervention:
    """Hold a site at its values in another run ``source`` (a :class:`RunResult` that captured the
    site), for severing. Example: ``freeze("mlp_out", corrupted_run, positions=[e - 1])``."""
    site = _site(site)
    arr = getattr(source, site, None)
    if arr is None:
        raise ValueError(f"freeze: the source run did not capture {site!r}")
    lay = _tuple(layers)
    pos = _tuple(positions)
    v = arr if site == "embed" else arr[list(lay) if lay is not None else slice(None)]
    if pos is not None:
        v = v[..., list(pos), :]
    return Intervention("patch", site, "set", lay, pos, np.ascontiguousarray(v, dtype=np.float32), seq=seq)


def block_attention(layers, queries, keys, seq=None) -> Intervention:
    """Remove the attention edges from each query position to each key position in ``layers`` by
    setting their pre-softmax scores to -inf. A query whose every edge is removed outputs zero.
    Example: ``block_attention(range(0, 9), queries=[-1], keys=[1, 2, 3])``."""
    return Intervention("block", layers=_tuple(layers), queries=_tuple(queries), keys=_tuple(keys), seq=seq)


def _norm_pos(pos, T, what, unit="tokens"):
    out = np.asarray(pos, dtype=np.int64)
    out = np.where(out < 0, out + T, out)
    if out.size and (out.min() < 0 or out.max() >= T):
        bad = int(np.asarray(pos)[(out < 0) | (out >= T)][0])
        if unit == "layers":
            raise IndexError(f"{what}: layer {bad} is out of range for a model of {T} layers")
        raise IndexError(f"{what}: position {bad} is out of range for a sequence of {T} tokens")
    return out


def compile_interventions(interventions, lens, n_layers: int, d: int):
    """Turn interventions into the patch and edge-block arrays of ``_core.Model.forward``.

    ``lens`` (S,) are the sequence lengths of the batch. Returns a dict of keyword arguments."""
    lens = [int(x) for x in lens]
    row0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    sites, layers_, rows, ops, values = [], [], [], [], []
    blocks = []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions must be factrace Intervention objects, got {type(iv).__name__}")
        seqs = range(len(lens)) if iv.seq is None else [iv.seq]
        for s in seqs:
            if not 0 <= s < len(lens):
                raise IndexError(f"intervention for sequence {s} but the batch has {len(lens)}")
            T = lens[s]
            if iv.kind == "block":
                lay = _norm_pos(iv.layers, n_layers, "block_attention", "layers")
                q = _norm_pos(iv.queries, T, "block_attention queries")
                k = _norm_pos(iv.keys, T, "block_attention keys")
                g = np.stack(np.meshgrid(lay, q + row0[s], k, indexing="ij"), -1).reshape(-1, 3)
                blocks.append(g)
                continue
            pos = np.arange(T) if iv.positions is None else _norm_pos(iv.positions, T, iv.site)
            if iv.site == "embed":
                if iv.layers is not None:
                    raise ValueError("the 'embed' site has no layers")
                lay = np.array([-1])
            else:
                lay = np.arange(n_layers) if iv.layers is None else _norm_pos(iv.layers, n_layers, iv.site, "layers")
            nl, npos = len(lay), len(pos)
            sites.append(np.full(nl * npos, SITES[iv.site], np.int32))
            layers_.append(np.repeat(lay, npos).astype(np.int32))
            rows.append(np.tile(pos + row0[s], nl).astype(np.int64))
            ops.append(np.full(nl * npos, OPS[iv.op], np.int32))
            if iv.op == "zero":
                values.append(np.zeros((nl * npos, d), np.float32))
            else:
                shape = (npos, d) if iv.site == "embed" else (nl, npos, d)
                try:
                    v = np.broadcast_to(iv.value, shape)
                except ValueError:
                    raise ValueError(f"{iv.op} {iv.site}: value of shape {iv.value.shape} does not broadcast to "
                                     f"{shape} (layers x positions x d_model)") from None
                values.append(np.ascontiguousarray(v, dtype=np.float32).reshape(nl * npos, d))
    kw = {}
    if sites:
        kw.update(patch_site=np.concatenate(sites), patch_layer=np.concatenate(layers_),
                  patch_row=np.concatenate(rows), patch_op=np.concatenate(ops),
                  patch_value=np.concatenate(values))
    if blocks:
        kw["blocks"] = np.ascontiguousarray(np.concatenate(blocks), dtype=np.int64)
    return kw
