"""Interventions on the C forward pass, composable in one run (METHODS.md section 7).

Sites (the TransformerLens hook names in brackets), and the vector one position of a layer holds:

    ``"embed"``       token-embedding output, before learned positions (GPT-2), after Gemma's sqrt(d)
                      scaling: where causal tracing adds its noise. No layers. (d,)  [hook_embed]
    ``"resid_pre"``   a block's input (d,)  [hook_resid_pre]
    ``"resid_mid"``   the residual after the attention add; sequential blocks only (d,)  [hook_resid_mid]
    ``"attn_out"``    what the attention adds to the residual stream (Gemma: after its post-norm) (d,)
    ``"mlp_out"``     what the MLP adds (d,)
    ``"resid_post"``  a block's output, the next block's input (alias ``"hidden"``) (d,)
    ``"q"``           queries, per head: the W_Q projection (+ bias) before q-norm and rotary (H, dh)
    ``"k"``, ``"v"``  keys (before k-norm and rotary) and values, per key-value head (KV, dh)
    ``"z"``           per-head mixed values, the input of W_O (H, dh)  [hook_z]
    ``"attn"``        attention probabilities of each query position and head over the keys (H, P);
                      what is set is used as is (nothing renormalises)  [hook_pattern]
    ``"mlp_post"``    the MLP's hidden activations, the input of W_down: act(gate) * up, or act(up) (F,)

Every site takes ``layers=`` (default all; not for ``embed``) and ``positions=`` (default all; negative
values count from the end); head sites take ``heads=`` (KV heads for ``k``/``v``), ``mlp_post`` takes
``neurons=``, ``attn`` takes ``keys=`` (key positions; default all).

Operations: :func:`set_values`, :func:`add`, :func:`zero`, :func:`scale`, :func:`freeze` (hold a site at its
values in another run), :func:`mean_ablate` (the mean over reference runs, per position or over
positions), :func:`resample_ablate` (the values of another prompt's run), :func:`add_direction` /
:func:`project_out` (steering), and :func:`block_attention` (remove attention edges before the softmax; the
remaining weights renormalise). Each compiles to flat arrays for one C call.

Example:
    >>> import numpy as np, factrace as ft
    >>> clean = m.run(ids, capture=["mlp_out", "z"])                                  # doctest: +SKIP
    >>> r = m.run(ids, interventions=[                                               # doctest: +SKIP
    ...     ft.add("embed", noise, positions=[1, 2, 3]),
    ...     ft.zero("z", layers=5, heads=[2, 7]),                 # ablate two heads of layer 5
    ...     ft.set_values("mlp_post", 3.0, layers=2, neurons=[11]),  # pin one neuron
    ...     ft.freeze("mlp_out", clean, layers=[4, 5], positions=[3]),
    ...     ft.block_attention(layers=range(0, 9), queries=[-1], keys=[1, 2, 3])])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core

# site name -> (C id, what indexes it beyond layer and position: None, "heads", "kv_heads", "neurons", "keys")
SITES = {"embed": (_core.SITE_EMBED, None), "resid_pre": (_core.SITE_RESID_PRE, None),
         "resid_mid": (_core.SITE_RESID_MID, None), "attn_out": (_core.SITE_ATTN_OUT, None),
         "mlp_out": (_core.SITE_MLP_OUT, None), "resid_post": (_core.SITE_RESID_POST, None),
         "hidden": (_core.SITE_RESID_POST, None), "q": (_core.SITE_Q, "heads"), "k": (_core.SITE_K, "kv_heads"),
         "v": (_core.SITE_V, "kv_heads"), "z": (_core.SITE_Z, "heads"), "attn": (_core.SITE_ATTN, "keys"),
         "mlp_post": (_core.SITE_MLP_POST, "neurons")}
OPS = {"set": _core.OP_SET, "add": _core.OP_ADD, "zero": _core.OP_ZERO, "mul": _core.OP_MUL,
       "project": _core.OP_PROJECT}


@dataclass(frozen=True)
class Intervention:
    """One intervention; build it with the functions of this module. ``seq`` picks one sequence of a batch
    (None: every sequence)."""

    kind: str                       # "patch" or "block"
    site: str | None = None
    op: str | None = None
    layers: tuple | None = None     # None: every layer
    positions: tuple | None = None  # None: every position; negative values count from the end
    value: np.ndarray | None = None
    heads: tuple | None = None      # head sites: query heads (q, z, attn) or key-value heads (k, v)
    neurons: tuple | None = None    # mlp_post
    keys: tuple | None = None       # attn: key positions; block_attention: the blocked keys
    queries: tuple | None = None    # block_attention
    seq: int | None = None
    total_embed: bool = False       # "embed" values taken from RunResult.embed (token + learned positions)


def _tuple(x, what="layers and positions"):
    if x is None:
        return None
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return (int(x),)
    out = []
    for v in x:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{what} must be integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


def _site(site):
    if site not in SITES:
        raise ValueError(f"unknown site {site!r}; sites: {', '.join(SITES)}")
    return "resid_post" if site == "hidden" else site


def _patch(site, op, value, positions, layers, heads, neurons, keys, seq, total_embed=False):
    site = _site(site)
    extra = SITES[site][1]
    for name, given, ok in (("heads", heads, extra in ("heads", "kv_heads", "keys")), ("neurons", neurons, extra == "neurons"),
                            ("keys", keys, extra == "keys")):
        if given is not None and not ok:
            raise ValueError(f"the {site!r} site takes no {name}=")
    if site == "attn" and heads is not None:
        heads = _tuple(heads, "heads")
    v = None if value is None else np.asarray(value, dtype=np.float32)
    return Intervention("patch", site, op, _tuple(layers), _tuple(positions), v, _tuple(heads, "heads"),
                        _tuple(neurons, "neurons"), _tuple(keys, "keys"), seq=seq,
                        total_embed=bool(total_embed and site == "embed"))


def add(site: str, value, positions=None, layers=None, seq=None, heads=None, neurons=None, keys=None) -> Intervention:
    """Add ``value`` at a site. ``value`` broadcasts to the site's value shape (see :func:`value_shape`):
    (n_layers, n_positions, d) for residual sites ((n_positions, d) for ``"embed"``), (n_layers, n_positions,
    n_heads, dh) for head sites, (n_layers, n_positions, n_neurons) for ``mlp_post``, (n_layers,
    n_positions, n_heads, n_keys) for ``attn``. Example: ``add("embed", noise (3, d), positions=[1, 2, 3])``."""
    return _patch(site, "add", value, positions, layers, heads, neurons, keys, seq)


def set_values(site: str, value, positions=None, layers=None, seq=None, heads=None, neurons=None,
               keys=None) -> Intervention:
    """Set a site to ``value`` (restoration, patching), broadcast as in :func:`add`.
    Example: ``set_values("resid_post", clean.resid_post[5, [4]], layers=5, positions=4)``."""
    return _patch(site, "set", value, positions, layers, heads, neurons, keys, seq)


def zero(site: str, layers=None, positions=None, seq=None, heads=None, neurons=None, keys=None) -> Intervention:
    """Zero a site (knockout, zero ablation). Default: every layer and position.
    Example: ``zero("mlp_out", layers=range(3, 9))``, ``zero("z", layers=4, heads=[0, 3])``."""
    return _patch(site, "zero", None, positions, layers, heads, neurons, keys, seq)


def scale(site: str, factor, layers=None, positions=None, seq=None, heads=None, neurons=None,
          keys=None) -> Intervention:
    """Multiply a site by ``factor`` (a number, or an array broadcast as in :func:`add`).
    Example: ``scale("attn", 0.0, layers=3, heads=1, keys=[2])`` removes one edge without renormalising."""
    return _patch(site, "mul", factor, positions, layers, heads, neurons, keys, seq)


def add_direction(site: str, direction, coeff: float = 1.0, layers=None, positions=None, seq=None,
                  heads=None, neurons=None, keys=None) -> Intervention:
    """Steering: add ``coeff * direction`` at a site. ``direction`` (w,): the width of one position's patched
    vector: (d,) for residual sites, (dh,) for head sites (added to each head of ``heads``), (n_neurons,)
    for ``mlp_post``, (n_keys,) for ``attn``; or any array broadcast as in :func:`add`. Default: every
    layer and position. Example: ``add_direction("resid_post", u, 4.0, layers=6)``."""
    d = np.asarray(direction, np.float32)
    return _patch(site, "add", np.float32(coeff) * d, positions, layers, heads, neurons, keys, seq)


def project_out(site: str, direction, layers=None, positions=None, seq=None, heads=None,
                neurons=None, keys=None) -> Intervention:
    """Remove the component along ``direction`` (w,): x <- x - (x.u / u.u) u (the dot products in float64),
    where x is one position's selected vector: (d,) for residual sites; each head's (dh,) for head sites;
    the (n_neurons,) vector of the selected neurons for ``mlp_post`` (one projection in their span, also
    when they are not contiguous); each head's (n_keys,) probabilities for ``attn``. Default: every layer
    and position. Example: ``project_out("resid_post", u, layers=range(4, 8))``."""
    return _patch(site, "project", np.asarray(direction, np.float32), positions, layers, heads, neurons, keys, seq)


def _site_values(site, source, layers, heads, neurons, keys):
    """The values of a site in a captured run (a RunResult), indexed like the patch they feed."""
    arr = getattr(source, site, None)
    if arr is None:
        raise ValueError(f"the source run did not capture {site!r} (run it with capture=[{site!r}, ...])")
    v = arr if site == "embed" else arr[list(layers) if layers is not None else slice(None)]
    if site == "attn":  # (L, H, T, T) -> (L, T, H, keys)
        v = np.moveaxis(v, 1, 2)
        if heads is not None:
            v = v[:, :, list(heads)]
        if keys is not None:
            v = v[..., list(keys)]
        return v
    if heads is not None:
        v = v[:, :, list(heads)]
    if neurons is not None:
        v = v[..., list(neurons)]
    return v


def freeze(site: str, source, layers=None, positions=None, seq=None, heads=None, neurons=None,
           keys=None) -> Intervention:
    """Hold a site at its values in another run ``source`` (a :class:`RunResult` that captured the site and
    has the same positions; severing, activation patching). For ``"embed"`` the values are
    ``source.embed``, the embedding as captured (GPT-2: token + learned position embeddings): the patched
    run starts from that total at those positions. Example: ``freeze("mlp_out", corrupted_run,
    positions=[e - 1])``, ``freeze("z", other_run, layers=9, heads=[6])``."""
    site = _site(site)
    lay, pos = _tuple(layers), _tuple(positions)
    v = _site_values(site, source, lay, _tuple(heads, "heads"), _tuple(neurons, "neurons"), _tuple(keys, "keys"))
    if pos is not None:
        v = v[list(pos)] if site == "embed" else v[:, list(pos)]
    return _patch(site, "set", np.ascontiguousarray(v), pos, lay, heads, neurons, keys, seq, total_embed=True)


def resample_ablate(site: str, source, layers=None, positions=None, seq=None, heads=None, neurons=None,
                    keys=None) -> Intervention:
    """Resample ablation: the site takes its values from a run of another prompt (``source``, a RunResult of
    the same length). The same as :func:`freeze` with a run of a different input.

    Example:
        >>> other = m.run(m.encode("Fact: The Eiffel Tower is in the country of"), capture=["z"])  # doctest: +SKIP
        >>> m.run(ids, interventions=[resample_ablate("z", other, layers=[5], heads=[1])])          # doctest: +SKIP
    """
    return freeze(site, source, layers, positions, seq, heads, neurons, keys)


def site_mean(site: str, runs, per_position: bool = True) -> np.ndarray:
    """The mean of a site over reference runs (RunResults that captured it): per position ((L, T, ...) with
    every run of the same length T), or over positions too ((L, 1, ...), any lengths).

    Example:
        >>> runs = m.run([m.encode(p) for p in prompts], capture=["mlp_post"])     # doctest: +SKIP
        >>> site_mean("mlp_post", runs, per_position=False).shape                  # doctest: +SKIP
        (30, 1, 1536)
    """
    site = _site(site)
    arrs = [getattr(r, site) for r in runs]
    if any(a is None for a in arrs):
        raise ValueError(f"every reference run must capture {site!r}")
    if site == "attn":
        raise ValueError("mean ablation of attention patterns needs equal lengths; use freeze with a mean you build")
    if per_position:
        if len({a.shape for a in arrs}) != 1:
            raise ValueError("per-position means need reference runs of the same length (or per_position=False)")
        return np.mean(np.stack(arrs).astype(np.float64), 0).astype(np.float32)
    axis = 0 if site == "embed" else 1
    flat = np.concatenate([np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1) for a in arrs]).astype(np.float64)
    m = flat.mean(0).reshape(np.moveaxis(arrs[0], axis, 0).shape[1:]).astype(np.float32)
    return m[None] if site == "embed" else m[:, None]


def mean_ablate(site: str, reference, model=None, per_position: bool = True, layers=None, positions=None, seq=None,
                heads=None, neurons=None) -> Intervention:
    """Mean ablation: set a site to its mean over a reference set. ``reference``: RunResults that captured the
    site, or prompts / token-id sequences (then ``model`` runs them). ``per_position=True`` (default): the
    mean at each position (references of the run's length); False: one mean over every position. For
    ``"embed"`` the mean is of the embedding as captured (token + learned positions; see :func:`freeze`).
    Example: ``mean_ablate("z", prompts, m, layers=range(12), heads=[3], positions=[-1])``."""
    site = _site(site)
    runs = list(reference)
    if runs and not hasattr(runs[0], "ids"):
        if model is None:
            raise ValueError("mean_ablate with prompts needs the model: mean_ablate(site, prompts, model)")
        runs = model.run(runs, capture=[site], logits=None)
        runs = runs if isinstance(runs, list) else [runs]
    mean = site_mean(site, runs, per_position)
    lay = _tuple(layers)
    v = mean if site == "embed" else mean[list(lay) if lay is not None else slice(None)]
    if heads is not None:
        v = v[:, :, list(_tuple(heads, "heads"))]
    if neurons is not None:
        v = v[..., list(_tuple(neurons, "neurons"))]
    pos = _tuple(positions)
    if per_position and pos is not None:
        v = v[list(pos)] if site == "embed" else v[:, list(pos)]
    return _patch(site, "set", np.ascontiguousarray(v), pos, lay, heads, neurons, None, seq, total_embed=True)


def block_attention(layers, queries, keys, seq=None) -> Intervention:
    """Remove the attention edges from each query position to each key position in ``layers`` by setting
    their pre-softmax scores to -inf (the remaining weights renormalise). A query whose every edge is removed
    outputs zero. Example: ``block_attention(range(0, 9), queries=[-1], keys=[1, 2, 3])``."""
    return Intervention("block", layers=_tuple(layers), queries=_tuple(queries), keys=_tuple(keys), seq=seq)


# ---------------------------------------------------------------------------------------------
# compilation to the C core's arrays

def _norm_pos(pos, T, what, unit="tokens"):
    out = np.asarray(pos, dtype=np.int64)
    out = np.where(out < 0, out + T, out)
    if out.size and (out.min() < 0 or out.max() >= T):
        bad = int(np.asarray(pos)[(out < 0) | (out >= T)][0])
        if unit == "layers":
            raise IndexError(f"{what}: layer {bad} is out of range for a model of {T} layers")
        raise IndexError(f"{what}: {unit[:-1] if unit.endswith('s') else unit} {bad} is out of range for "
                         f"{T} {unit}")
    return out


def _runs(idx):
    """Consecutive runs of sorted-as-given indices: [(start, length), ...] (neurons 4, 5, 6 -> (4, 3))."""
    out = []
    for i in idx:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((int(i), 1))
    return out


def value_shape(iv: Intervention, cfg, T: int, n_layers: int, n_pos: int) -> tuple:
    """The shape a patch's value broadcasts to (see :func:`add`)."""
    site, extra = iv.site, SITES[iv.site][1]
    lead = (n_pos,) if site == "embed" else (n_layers, n_pos)
    if extra is None:
        return lead + (cfg.d_model,)
    if extra in ("heads", "kv_heads"):
        nh = len(iv.heads) if iv.heads is not None else (cfg.n_heads if extra == "heads" else cfg.n_kv_heads)
        return lead + (nh, cfg.d_head)
    if extra == "neurons":
        return lead + (len(iv.neurons) if iv.neurons is not None else cfg.d_mlp,)
    nh = len(iv.heads) if iv.heads is not None else cfg.n_heads
    return lead + (nh, len(iv.keys) if iv.keys is not None else T)


def _slices(iv: Intervention, cfg, T: int):
    """[(head or -1, offset, width)] of one position's site vector that a patch touches, in value order."""
    extra, dh = SITES[iv.site][1], cfg.d_head
    if extra is None:
        return [(-1, 0, cfg.d_model)]
    if extra in ("heads", "kv_heads"):
        nh = cfg.n_heads if extra == "heads" else cfg.n_kv_heads
        heads = _norm_pos(iv.heads, nh, iv.site, "heads") if iv.heads is not None else range(nh)
        return [(-1, int(h) * dh, dh) for h in heads]
    if extra == "neurons":
        if iv.neurons is None:
            return [(-1, 0, cfg.d_mlp)]
        return [(-1, o, w) for o, w in _runs(_norm_pos(iv.neurons, cfg.d_mlp, "mlp_post", "neurons"))]
    heads = _norm_pos(iv.heads, cfg.n_heads, "attn", "heads") if iv.heads is not None else range(cfg.n_heads)
    keys = _norm_pos(iv.keys, T, "attn keys") if iv.keys is not None else range(T)
    return [(int(h), o, w) for h in heads for o, w in _runs(keys)]


def _project_span(sl, val, iv, cfg, P):
    """A projection over non-contiguous neurons (or keys of a head) is one projection in the span of the
    selected elements: one slice from the first to the last of them, the direction zero in the gaps (x.u
    and the update then involve the selected elements only)."""
    extra = SITES[iv.site][1]
    if extra == "neurons":
        idx = _norm_pos(iv.neurons, cfg.d_mlp, "mlp_post", "neurons")
        groups = [(-1, idx)]
    else:
        idx = _norm_pos(iv.keys, P, "attn keys")
        heads = _norm_pos(iv.heads, cfg.n_heads, "attn", "heads") if iv.heads is not None else range(cfg.n_heads)
        groups = [(int(h), idx) for h in heads]
    lo, hi = int(idx.min()), int(idx.max()) + 1
    if hi - lo == len(idx) and np.all(np.diff(idx) == 1):
        return sl, val
    lead = val.shape[:-1]
    out = np.zeros(lead + (hi - lo,), np.float32)
    out[..., idx - lo] = val
    if extra == "keys":  # (..., heads, keys)
        return [(h, lo, hi - lo) for h, _ in groups], np.ascontiguousarray(out)
    return [(-1, lo, hi - lo)], np.ascontiguousarray(out)


def compile_interventions(interventions, lens, cfg, starts=None, w_pos=None):
    """Turn interventions into the patch and edge-block arrays of ``_core.Model.forward``.

    ``lens`` (S,) are the sequence lengths of the batch, ``cfg`` the model's ModelConfig, ``starts`` (S,)
    the absolute position of each sequence's first row (prefix caches; default 0: attention patterns then
    have ``lens[s]`` keys), ``w_pos`` (n_ctx, d) the learned position embeddings (GPT-2): subtracted from
    ``"embed"`` values taken from captured embeddings (:func:`freeze`, :func:`mean_ablate`), which include
    them. Returns a dict of keyword arguments."""
    lens = [int(x) for x in lens]
    starts = [0] * len(lens) if starts is None else [int(x) for x in starts]
    row0 = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    L = cfg.n_layers
    cols = {k: [] for k in ("site", "layer", "row", "op", "offset", "width", "head", "voff")}
    values, nval, blocks = [], 0, []
    for iv in interventions:
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions must be factrace Intervention objects, got {type(iv).__name__}")
        seqs = range(len(lens)) if iv.seq is None else [iv.seq]
        for s in seqs:
            if not 0 <= s < len(lens):
                raise IndexError(f"intervention for sequence {s} but the batch has {len(lens)}")
            T, P = lens[s], starts[s] + lens[s]
            if iv.kind == "block":
                lay = _norm_pos(iv.layers, L, "block_attention", "layers")
                q = _norm_pos(iv.queries, T, "block_attention queries")
                k = _norm_pos(iv.keys, P, "block_attention keys")
                blocks.append(np.stack(np.meshgrid(lay, q + row0[s], k, indexing="ij"), -1).reshape(-1, 3))
                continue
            if iv.site == "resid_mid" and getattr(cfg, "parallel", False):
                raise ValueError("a parallel-residual block has no resid_mid (attention and MLP both read "
                                 "resid_pre); patch attn_out, mlp_out or resid_post")
            pos = np.arange(T) if iv.positions is None else _norm_pos(iv.positions, T, iv.site)
            if iv.site == "embed":
                if iv.layers is not None:
                    raise ValueError("the 'embed' site has no layers")
                lay = np.array([-1])
            else:
                lay = np.arange(L) if iv.layers is None else _norm_pos(iv.layers, L, iv.site, "layers")
            sl = _slices(iv, cfg, P)
            shape = value_shape(iv, cfg, P, len(lay), len(pos))
            val = None
            if iv.op != "zero":
                try:
                    val = np.ascontiguousarray(np.broadcast_to(iv.value, shape), dtype=np.float32)
                except ValueError:
                    raise ValueError(f"{iv.op} {iv.site}: value of shape {iv.value.shape} does not broadcast to "
                                     f"{shape} ({_shape_doc(iv.site)})") from None
                if iv.total_embed and getattr(cfg, "learned_pos", False):
                    if w_pos is None:
                        raise ValueError("embed values from a captured run include the learned position "
                                         "embeddings: compile_interventions needs w_pos")
                    val = np.ascontiguousarray(val - np.asarray(w_pos, np.float32)[pos + starts[s]])
                if iv.op == "project" and ((iv.site == "mlp_post" and iv.neurons is not None)
                                           or (iv.site == "attn" and iv.keys is not None)):
                    sl, val = _project_span(sl, val, iv, cfg, P)
                values.append(val.reshape(-1))
            per = val.size // (len(lay) * len(pos)) if val is not None else 0  # floats per (layer, position)
            # one patch per (layer, position, slice), values in row-major order of (layer, position, slice)
            n_sl = len(sl)
            li, pi, si = np.meshgrid(np.arange(len(lay)), np.arange(len(pos)), np.arange(n_sl), indexing="ij")
            li, pi, si = li.ravel(), pi.ravel(), si.ravel()
            heads = np.array([h for h, _, _ in sl], np.int32)[si]
            offs = np.array([o for _, o, _ in sl], np.int64)[si]
            widths = np.array([w for _, _, w in sl], np.int32)[si]
            within = np.concatenate([[0], np.cumsum([w for _, _, w in sl])[:-1]]).astype(np.int64)[si]
            cols["site"].append(np.full(len(li), SITES[iv.site][0], np.int32))
            cols["layer"].append(lay[li].astype(np.int32))
            cols["row"].append((pos[pi] + row0[s]).astype(np.int64))
            cols["op"].append(np.full(len(li), OPS[iv.op], np.int32))
            cols["offset"].append(offs)
            cols["width"].append(widths)
            cols["head"].append(heads)
            cols["voff"].append(nval + (li * len(pos) + pi) * per + within if val is not None
                                else np.zeros(len(li), np.int64))
            nval += val.size if val is not None else 0
    kw = {}
    if cols["site"]:
        kw = {f"patch_{k}": np.concatenate(v) for k, v in cols.items()}
        kw["patch_value"] = np.concatenate(values) if values else np.zeros(1, np.float32)
    if blocks:
        kw["blocks"] = np.ascontiguousarray(np.concatenate(blocks), dtype=np.int64)
    return kw


def _shape_doc(site):
    extra = SITES[site][1]
    return {None: "layers x positions x d_model" if site != "embed" else "positions x d_model",
            "heads": "layers x positions x heads x d_head", "kv_heads": "layers x positions x kv heads x d_head",
            "neurons": "layers x positions x neurons", "keys": "layers x positions x heads x keys"}[extra]
