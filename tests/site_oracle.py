"""Torch-hook oracle for factrace's intervention sites: the same edits done to a Hugging Face model (eager,
float32) with forward hooks, as a TransformerLens / nnsight user would write them.

Sites and the tensor each is read from / written to (T tokens, factrace's layout in brackets):

    embed       output of the token-embedding module (wte / embed_tokens / embed_in; Gemma: after its
                sqrt(d) scale), before learned positions are added          [(T, d)]
    resid_pre   the hidden_states argument of decoder block l                 [(L, T, d)]
    resid_mid   block input + attention output (sequential blocks): edited through the attention output,
                a' = edit(resid_pre + a) - resid_pre                          [(L, T, d)]
    attn_out    output[0] of the attention module (Gemma 3: of post_attention_layernorm)
    mlp_out     output of the MLP (Gemma 3: of post_feedforward_layernorm)
    resid_post  output of decoder block l
    q, k, v     output of q_proj / k_proj / v_proj (GPT-2: c_attn's three thirds; GPT-NeoX: query_key_value
                viewed (T, H, 3, dh)), before q/k norm and rotary         [(L, T, heads, dh)]
    z           input of the attention output projection (o_proj / c_proj / dense / out_proj)
    attn        the probabilities handed to ``nn.functional.dropout`` inside the attention module (every
                eager attention of transformers 5 calls it between the softmax and the value product)
                                                                              [(L, H, T, T)]
    mlp_post    input of the MLP's output projection (down_proj / c_proj / dense_4h_to_h / fc_out) [(L, T, F)]

An edit is a dict: ``site``, ``op`` (set, add, zero, mul, project), ``layers`` (list; None for embed),
``positions`` (list, may be negative), ``heads`` / ``neurons`` / ``keys`` (lists or None = all) and ``value``
broadcast to (n_layers, n_positions, ...) like factrace's (see factrace.interventions.value_shape).
``project`` removes the component along value from the whole selected vector of each (layer, position,
head): for ``mlp_post`` with neurons=[1, 2, 5], one projection in the 3-dim space of those neurons.
"""
from __future__ import annotations

import numpy as np

SITES = ("embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "q", "k", "v", "z", "attn",
         "mlp_post")


class Parts:
    """The modules of one transformers model that the sites hang on."""

    def __init__(self, model):
        cfg = model.config
        mt = cfg.model_type
        self.mt = mt
        if mt == "gpt2":
            base = model.transformer
            self.embed, self.layers, self.final_norm = base.wte, list(base.h), base.ln_f
            self.attn = [l.attn for l in self.layers]
            self.attn_out, self.mlp_out = self.attn, [l.mlp for l in self.layers]
            self.o_proj = [l.attn.c_proj for l in self.layers]
            self.down = [l.mlp.c_proj for l in self.layers]
            self.qkv = [("gpt2", l.attn.c_attn) for l in self.layers]
        elif mt == "gptj":
            base = model.transformer
            self.embed, self.layers, self.final_norm = base.wte, list(base.h), base.ln_f
            self.attn = [l.attn for l in self.layers]
            self.attn_out, self.mlp_out = self.attn, [l.mlp for l in self.layers]
            self.o_proj = [l.attn.out_proj for l in self.layers]
            self.down = [l.mlp.fc_out for l in self.layers]
            self.qkv = [("sep", (l.attn.q_proj, l.attn.k_proj, l.attn.v_proj)) for l in self.layers]
        elif mt == "gpt_neox":
            base = model.gpt_neox
            self.embed, self.layers, self.final_norm = base.embed_in, list(base.layers), base.final_layer_norm
            self.attn = [l.attention for l in self.layers]
            self.attn_out, self.mlp_out = self.attn, [l.mlp for l in self.layers]
            self.o_proj = [l.attention.dense for l in self.layers]
            self.down = [l.mlp.dense_4h_to_h for l in self.layers]
            self.qkv = [("neox", l.attention.query_key_value) for l in self.layers]
        else:  # llama, qwen2, qwen3, mistral, gemma3_text
            base = model.model
            self.embed, self.layers, self.final_norm = base.embed_tokens, list(base.layers), base.norm
            self.attn = [l.self_attn for l in self.layers]
            if mt.startswith("gemma3"):
                self.attn_out = [l.post_attention_layernorm for l in self.layers]
                self.mlp_out = [l.post_feedforward_layernorm for l in self.layers]
            else:
                self.attn_out, self.mlp_out = self.attn, [l.mlp for l in self.layers]
            self.o_proj = [l.self_attn.o_proj for l in self.layers]
            self.down = [l.mlp.down_proj for l in self.layers]
            self.qkv = [("sep", (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj)) for l in self.layers]
        self.L = len(self.layers)
        self.H = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
        self.KV = getattr(cfg, "num_key_value_heads", None) or self.H
        d = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
        self.dh = getattr(cfg, "head_dim", None) or d // self.H
        self.parallel = (mt == "gptj") or (mt == "gpt_neox" and cfg.use_parallel_residual)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(out, new):
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    return new


def _norm(idx, n):
    return [int(i) % n for i in idx]


def _value_shape(e, parts, T, F, d):
    nl = 1 if e["site"] == "embed" else len(e["layers"])
    lead = (len(e["positions"]),) if e["site"] == "embed" else (nl, len(e["positions"]))
    s = e["site"]
    if s in ("q", "z"):
        return lead + (len(e["heads"]) if e.get("heads") is not None else parts.H, parts.dh)
    if s in ("k", "v"):
        return lead + (len(e["heads"]) if e.get("heads") is not None else parts.KV, parts.dh)
    if s == "mlp_post":
        return lead + (len(e["neurons"]) if e.get("neurons") is not None else F,)
    if s == "attn":
        return lead + (len(e["heads"]) if e.get("heads") is not None else parts.H,
                       len(e["keys"]) if e.get("keys") is not None else T)
    return lead + (d,)


def _op(x, op, u):
    """x: a torch tensor (..., w) of selected elements; returns the edited tensor (float32)."""
    import torch

    if op == "zero":
        return torch.zeros_like(x)
    u = torch.as_tensor(np.array(u, np.float32))
    if op == "set":
        return u.expand_as(x).clone()
    if op == "add":
        return x + u
    if op == "mul":
        return x * u
    if op == "project":  # x - (x.u / u.u) u along the last axis, in float64
        x64, u64 = x.double(), u.double().expand_as(x)
        c = (x64 * u64).sum(-1, keepdim=True) / (u64 * u64).sum(-1, keepdim=True)
        return (x64 - c * u64).float()
    raise ValueError(op)


def _apply(view, e, li, T, parts):
    """Apply edit e of layer index li to ``view``: (T, W) residual / (T, n, dh) heads / (T, F) neurons /
    (H, T, T) attention probabilities (edited in place)."""
    site = e["site"]
    val = e["_value"]  # full shape (nl, np, ...) or (np, ...) for embed
    for pi, p in enumerate(_norm(e["positions"], T)):
        v = None if val is None else val[pi] if site == "embed" else val[li, pi]
        if site in ("q", "k", "v", "z"):
            n = view.shape[1]
            heads = _norm(e["heads"], n) if e.get("heads") is not None else list(range(n))
            for hi, h in enumerate(heads):
                view[p, h] = _op(view[p, h], e["op"], None if v is None else v[hi])
        elif site == "mlp_post":
            nr = _norm(e["neurons"], view.shape[1]) if e.get("neurons") is not None else list(range(view.shape[1]))
            view[p, nr] = _op(view[p, nr], e["op"], v)
        elif site == "attn":
            heads = _norm(e["heads"], parts.H) if e.get("heads") is not None else list(range(parts.H))
            keys = _norm(e["keys"], T) if e.get("keys") is not None else list(range(T))
            for hi, h in enumerate(heads):
                view[h, p, keys] = _op(view[h, p, keys], e["op"], None if v is None else v[hi])
        else:
            view[p] = _op(view[p], e["op"], v)


def run(model, ids, edits=(), capture=(), parts=None):
    """Run ``ids`` (T,) through ``model`` with ``edits`` applied by hooks; returns a dict with ``logits``
    (T, V), ``resid_final`` (T, d) and each site of ``capture`` in factrace's layout (after the edits),
    ``embed_total`` (T, d) included when "embed" is captured (the input of block 0)."""
    import torch

    parts = parts or Parts(model)
    ids = [int(i) for i in ids]
    T, L = len(ids), parts.L
    cfg = model.config
    d = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
    F = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d
    edits = [dict(e) for e in edits]
    for e in edits:
        shape = _value_shape(e, parts, T, F, d)
        e["_value"] = None if e["op"] == "zero" else np.broadcast_to(np.asarray(e["value"], np.float32), shape)
        e["_layers"] = None if e["site"] == "embed" else _norm(e["layers"], L)
    cap = {s: {} for s in capture}
    state = {"layer": None, "resid_pre": {}}

    def edits_at(site, l):
        for e in edits:
            if e["site"] == site and (site == "embed" or l in e["_layers"]):
                yield e, (0 if site == "embed" else e["_layers"].index(l))

    def store(site, l, view):
        if site in cap:
            cap[site][l] = view.detach().clone().numpy()

    def residual_site(site, l, x):
        """x (1, T, d) -> edited copy"""
        y = x.detach().clone()
        for e, li in edits_at(site, l):
            _apply(y[0], e, li, T, parts)
        store(site, l, y[0])
        return y

    hooks = []

    def hook_embed(mod, args, out):
        return residual_site("embed", -1, out)

    def pre_layer(l):
        def f(mod, args, kwargs):
            if args:
                x = residual_site("resid_pre", l, args[0])
                state["resid_pre"][l] = x
                if l == 0 and "embed" in cap:
                    cap["embed_total"] = x[0].detach().clone().numpy()
                return (x,) + tuple(args[1:]), kwargs
            x = residual_site("resid_pre", l, kwargs["hidden_states"])
            state["resid_pre"][l] = x
            if l == 0 and "embed" in cap:
                cap["embed_total"] = x[0].detach().clone().numpy()
            kwargs = dict(kwargs, hidden_states=x)
            return args, kwargs
        return f

    def post_layer(l):
        def f(mod, args, out):
            return _replace_first(out, residual_site("resid_post", l, _first(out)))
        return f

    def post_attn_out(l):
        def f(mod, args, out):
            a = residual_site("attn_out", l, _first(out))
            if not parts.parallel:
                pre = state["resid_pre"][l]
                mid = pre + a
                mid2 = residual_site("resid_mid", l, mid)
                if any(True for _ in edits_at("resid_mid", l)):
                    a = mid2 - pre
            return _replace_first(out, a)
        return f

    def post_mlp_out(l):
        def f(mod, args, out):
            return _replace_first(out, residual_site("mlp_out", l, _first(out)))
        return f

    def head_view(x, n):
        return x[0].view(T, n, parts.dh)

    def post_qkv(l, kind, which):
        def f(mod, args, out):
            y = out.detach().clone()
            if kind == "sep":
                sites = [which]
                views = {which: head_view(y, parts.H if which == "q" else parts.KV)}
            elif kind == "gpt2":
                sites = ["q", "k", "v"]
                dd = parts.H * parts.dh
                views = {s: y[0, :, i * dd:(i + 1) * dd].view(T, parts.H, parts.dh) for i, s in enumerate(sites)}
            else:  # neox: per head [q | k | v]
                sites = ["q", "k", "v"]
                y4 = y[0].view(T, parts.H, 3, parts.dh)
                views = {s: y4[:, :, i] for i, s in enumerate(sites)}
            for s in sites:
                vw = views[s].clone()
                for e, li in edits_at(s, l):
                    _apply(vw, e, li, T, parts)
                views[s].copy_(vw)
                store(s, l, vw)
            return y
        return f

    def pre_oproj(l):
        def f(mod, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().clone()
            vw = x[0].view(T, parts.H, parts.dh)
            for e, li in edits_at("z", l):
                _apply(vw, e, li, T, parts)
            store("z", l, vw)
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, input=x))
        return f

    def pre_down(l):
        def f(mod, args, kwargs):
            x = (args[0] if args else kwargs["input"]).detach().clone()
            for e, li in edits_at("mlp_post", l):
                _apply(x[0], e, li, T, parts)
            store("mlp_post", l, x[0])
            return ((x,) + tuple(args[1:]), kwargs) if args else (args, dict(kwargs, input=x))
        return f

    def pre_attn(l):
        def f(mod, args, kwargs):
            state["layer"] = l
        return f

    def post_attn(mod, args, out):
        state["layer"] = None

    def pre_final(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        cap_final["x"] = x.detach()[0].clone().numpy()

    cap_final = {}
    orig_dropout = torch.nn.functional.dropout

    def dropout(x, *a, **k):
        l = state["layer"]
        if l is not None and x.dim() == 4 and x.shape[-1] == T and x.shape[-2] == T:
            y = x.detach().clone()
            for e, li in edits_at("attn", l):
                _apply(y[0], e, li, T, parts)
            store("attn", l, y[0])
            x = y
        return orig_dropout(x, *a, **k)

    try:
        hooks.append(parts.embed.register_forward_hook(hook_embed))
        for l in range(L):
            hooks.append(parts.layers[l].register_forward_pre_hook(pre_layer(l), with_kwargs=True))
            hooks.append(parts.layers[l].register_forward_hook(post_layer(l)))
            hooks.append(parts.attn_out[l].register_forward_hook(post_attn_out(l)))
            hooks.append(parts.mlp_out[l].register_forward_hook(post_mlp_out(l)))
            kind, mods = parts.qkv[l]
            if kind == "sep":
                for which, mod in zip("qkv", mods):
                    hooks.append(mod.register_forward_hook(post_qkv(l, kind, which)))
            else:
                hooks.append(mods.register_forward_hook(post_qkv(l, kind, None)))
            hooks.append(parts.o_proj[l].register_forward_pre_hook(pre_oproj(l), with_kwargs=True))
            hooks.append(parts.down[l].register_forward_pre_hook(pre_down(l), with_kwargs=True))
            hooks.append(parts.attn[l].register_forward_pre_hook(pre_attn(l), with_kwargs=True))
            hooks.append(parts.attn[l].register_forward_hook(post_attn))
        hooks.append(parts.final_norm.register_forward_pre_hook(pre_final, with_kwargs=True))
        torch.nn.functional.dropout = dropout
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    finally:
        torch.nn.functional.dropout = orig_dropout
        for h in hooks:
            h.remove()
    res = {"logits": out.logits[0].float().numpy(), "resid_final": cap_final["x"]}
    for s in capture:
        if s == "embed":
            res["embed"] = cap[s][-1]
            res["embed_total"] = cap["embed_total"]
        elif s == "attn":
            res["attn"] = np.stack([cap[s][l] for l in range(L)])
        elif s == "resid_mid" and parts.parallel:
            continue
        else:
            res[s] = np.stack([cap[s][l] for l in range(L)])
    return res


def site_values(res, site, layers, positions, heads=None, neurons=None, keys=None, T=None):
    """The values of ``site`` in an oracle run ``res`` at (layers, positions, heads/neurons/keys), shaped like
    an edit's value: (n_layers, n_positions, ...), (n_positions, d) for embed (the total embedding: token +
    learned positions, as factrace's RunResult.embed)."""
    if site == "embed":
        a = res["embed_total"]
        return a[_norm(positions, a.shape[0])]
    a = res[site]
    if site == "attn":  # (L, H, T, T) -> (L, T, H, keys)
        a = np.moveaxis(a, 1, 2)
    L, Tn = a.shape[0], a.shape[1]
    a = a[_norm(layers, L)][:, _norm(positions, Tn)]
    if heads is not None:
        a = a[:, :, _norm(heads, a.shape[2])]
    if neurons is not None:
        a = a[..., _norm(neurons, a.shape[-1])]
    if keys is not None:
        a = a[..., _norm(keys, a.shape[-1])]
    return np.ascontiguousarray(a)
