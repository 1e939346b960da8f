"""The site x operation cases of tests/test_sites.py, shared by the test (factrace side, and the live torch
side) and tests/make_site_fixtures.py (which commits the torch side's results).

Every case is one intervention on prompt p0 of a fixture (7 tokens): a site of factrace.interventions, an
operation, and where it acts (layers, positions, heads / neurons / keys, chosen per site so that both ends
of each axis and negative indices occur). Operations:

    set, add, zero, scale     values drawn per case (seeded by the fixture and case name)
    project                   project_out along a random direction of the slice's width
    direction                 add_direction(u, coeff=2)
    freeze                    the site's values in a run of the same prompt with noise added to every
                              token embedding (severing's frozen run)
    resample                  resample_ablate: the values in a run of another prompt of the same length
    mean                      mean_ablate over 3 other prompts of the same length, per position
    mean_all                  mean_ablate over prompts of lengths T - 2 and T + 2, over positions

The torch side (tests/site_oracle.py) computes its own source runs and means with hooks. For ``embed``,
freeze / resample / mean act on the embedding as factrace captures it (token + learned positions): the
torch side sets the input of block 0 at those positions.
"""
from __future__ import annotations

import zlib

import numpy as np

import site_oracle

OPS = ("set", "add", "zero", "scale", "project", "direction", "freeze", "resample", "mean", "mean_all")
SITES = site_oracle.SITES


def site_params(site, L, H, KV):
    if site == "embed":
        return dict(positions=[1, -1])
    if site in ("q", "z"):
        return dict(layers=[L - 1], positions=[2, -1], heads=[0, H - 1])
    if site in ("k", "v"):
        return dict(layers=[0], positions=[0, 3], heads=[KV - 1])
    if site == "attn":
        return dict(layers=[-1], positions=[1, -1], heads=[H - 1], keys=[0, 2])
    if site == "mlp_post":
        return dict(layers=[0, -1], positions=[1, -1], neurons=[1, 2, 5])
    return dict(layers=[0, -1], positions=[1, -1])


def ops_for(site, parallel):
    if site == "resid_mid" and parallel:
        return ()
    if site == "attn":
        return tuple(o for o in OPS if o not in ("mean", "mean_all"))
    return OPS


def dims(cfg):
    """(L, H, KV, dh, d, F) of a factrace ModelConfig."""
    return cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp


def _width_shape(site, prm, cfg, T):
    L, H, KV, dh, d, F = dims(cfg)
    lead = (len(prm["positions"]),) if site == "embed" else (len(prm["layers"]), len(prm["positions"]))
    if site in ("q", "z", "k", "v"):
        return lead + (len(prm["heads"]), dh)
    if site == "mlp_post":
        return lead + (len(prm["neurons"]),)
    if site == "attn":
        return lead + (len(prm["heads"]), len(prm["keys"]))
    return lead + (d,)


def cases(name, cfg, T):
    """[case dict]: id, site, op, params, value (None or float32 array), for one fixture."""
    out = []
    for site in SITES:
        prm = site_params(site, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads)
        for op in ops_for(site, cfg.parallel):
            cid = f"{site}/{op}"
            rng = np.random.default_rng(zlib.crc32(f"{name}/{cid}".encode()))
            shape = _width_shape(site, prm, cfg, T)
            val = None
            if op == "set":
                val = rng.uniform(0, 0.4, shape) if site == "attn" else rng.normal(0, 0.5, shape)
            elif op == "add":
                val = rng.uniform(-0.1, 0.1, shape) if site == "attn" else rng.normal(0, 0.5, shape)
            elif op == "scale":
                val = rng.uniform(0.5, 1.5, shape)
            elif op in ("project", "direction"):
                val = rng.normal(0, 1.0, shape[-1])
            out.append(dict(id=cid, site=site, op=op, params=prm,
                            value=None if val is None else np.asarray(val, np.float32)))
    return out


def other_prompts(name, cfg, T):
    """Token ids the sources use: ``resample`` (T,), ``refs`` 3 x (T,), ``refs_var`` (T-2,) and (T+2,), and the
    embedding noise (T, d) of ``freeze``'s source run."""
    rng = np.random.default_rng(zlib.crc32(f"{name}/others".encode()))
    V = cfg.vocab_size
    lo = 3  # ordinary tokens (the fixtures' special tokens come first)
    return dict(resample=rng.integers(lo, V, T), refs=[rng.integers(lo, V, T) for _ in range(3)],
                refs_var=[rng.integers(lo, V, T - 2), rng.integers(lo, V, T + 2)],
                noise=rng.normal(0, 0.3, (T, cfg.d_model)).astype(np.float32))


# ---------------------------------------------------------------------------------------------------------
# factrace side

def factrace_interventions(m, case, ids, others):
    """The factrace interventions of a case (through the public API; sources run by factrace)."""
    import factrace.interventions as fi

    site, op, prm, val = case["site"], case["op"], dict(case["params"]), case["value"]
    T = len(ids)
    if op == "set":
        return [fi.set_values(site, val, **prm)]
    if op == "add":
        return [fi.add(site, val, **prm)]
    if op == "zero":
        return [fi.zero(site, **prm)]
    if op == "scale":
        return [fi.scale(site, val, **prm)]
    if op == "project":
        return [fi.project_out(site, val, **prm)]
    if op == "direction":
        return [fi.add_direction(site, val, 2.0, **prm)]
    if op == "freeze":
        src = m.run(ids, capture=[site], interventions=[fi.add("embed", others["noise"][:T])])
        return [fi.freeze(site, src, **prm)]
    if op == "resample":
        return [fi.resample_ablate(site, m.run(others["resample"], capture=[site]), **prm)]
    if op == "mean":
        return [fi.mean_ablate(site, others["refs"], m, **prm)]
    if op == "mean_all":
        return [fi.mean_ablate(site, others["refs_var"], m, per_position=False, **prm)]
    raise ValueError(op)


# ---------------------------------------------------------------------------------------------------------
# torch side

def _source_runs(hf, parts, ids, others, cache):
    """The torch side's source runs (every site captured), computed once per fixture."""
    if "runs" not in cache:
        sites = [s for s in SITES if not (s == "resid_mid" and parts.parallel)]
        T = len(ids)

        def run(x, edits=()):
            return site_oracle.run(hf, x, edits, capture=sites, parts=parts)

        cache["runs"] = dict(
            freeze=run(ids, [dict(site="embed", op="add", positions=list(range(T)), value=others["noise"][:T])]),
            resample=run(others["resample"]), refs=[run(r) for r in others["refs"]],
            refs_var=[run(r) for r in others["refs_var"]])
    return cache["runs"]


def oracle_edits(hf, parts, case, ids, others, cache=None):
    """The torch-hook edits of a case (source runs and means computed with hooks; ``cache``: a dict kept
    per fixture for the source runs)."""
    site, op, prm, val = case["site"], case["op"], case["params"], case["value"]
    cache = {} if cache is None else cache
    base = dict(site=site, **prm)
    if op in ("set", "add", "zero"):
        return [dict(base, op=op, value=val)]
    if op == "scale":
        return [dict(base, op="mul", value=val)]
    if op == "project":
        return [dict(base, op="project", value=val)]
    if op == "direction":
        return [dict(base, op="add", value=np.float32(2.0) * val)]
    sel = dict(layers=prm.get("layers"), positions=prm["positions"], heads=prm.get("heads"),
               neurons=prm.get("neurons"), keys=prm.get("keys"))
    src = _source_runs(hf, parts, ids, others, cache)
    if op in ("freeze", "resample"):
        value = site_oracle.site_values(src[op], site, **sel)
    elif op == "mean":
        value = np.mean(np.stack([site_oracle.site_values(r, site, **sel) for r in src["refs"]]).astype(np.float64),
                        0).astype(np.float32)
    else:  # mean_all: over every position of every reference
        runs = src["refs_var"]
        allpos = []
        for r, p in zip(runs, others["refs_var"]):
            v = site_oracle.site_values(r, site, **dict(sel, positions=list(range(len(p)))))
            allpos.append(np.moveaxis(v, 0 if site == "embed" else 1, 0))
        mean = np.concatenate(allpos).astype(np.float64).mean(0).astype(np.float32)
        value = mean[None] if site == "embed" else mean[:, None]
    if site == "embed":  # the total embedding: set the input of block 0
        return [dict(site="resid_pre", op="set", layers=[0], positions=prm["positions"], value=value[None])]
    return [dict(base, op="set", value=value)]


def sketch_matrix(d):
    """(d, 4) fixed random directions: the committed references keep resid_final (T, d) @ this."""
    return np.random.default_rng(20240501).standard_normal((d, 4)) / np.sqrt(d)
