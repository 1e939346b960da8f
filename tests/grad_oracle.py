"""Torch autograd oracle for factrace's gradients: the Hugging Face model (eager, float32) run once with
``retain_grad`` on the tensor of every site, the metric at one position backpropagated by torch.

Sites and the tensor whose ``.grad`` is read (T tokens; factrace's shapes in brackets):

    embed       output of the token-embedding module (Gemma: after its sqrt(d) scale)        [(T, d)]
    resid_pre   the hidden_states argument of decoder block l                              [(L, T, d)]
    resid_mid   the input of the norm before the MLP (sequential blocks)                   [(L, T, d)]
    attn_out    output[0] of the attention module (Gemma 3: of post_attention_layernorm)
    mlp_out     output of the MLP (Gemma 3: of post_feedforward_layernorm)
    resid_post  output of decoder block l
    q, k, v     outputs of q_proj / k_proj / v_proj (GPT-2: c_attn's three thirds; GPT-NeoX: query_key_value
                viewed (T, H, 3, dh)), before q/k norm and rotary                   [(L, T, heads, dh)]
    z           input of the attention output projection
    attn        the attention probabilities returned with output_attentions=True (the tensor the value
                product reads)                                                       [(L, H, T, T)]
    mlp_post    input of the MLP's output projection                                 [(L, T, F)]

torch and transformers are imported inside the functions.
"""
from __future__ import annotations

import numpy as np

SITES = ("embed", "resid_pre", "resid_mid", "attn_out", "mlp_out", "resid_post", "q", "k", "v", "z", "attn",
         "mlp_post")


def _modules(model):
    """embed module, layers, and per layer: attention-output module, MLP-output module, MLP-norm module
    (None for parallel blocks), o_proj, down projection, ("split"|"neox"|"sep", q/k/v modules)."""
    cfg = model.config
    mt = cfg.model_type
    if mt == "gpt2":
        base = model.transformer
        layers = list(base.h)
        per = [(l.attn, l.mlp, l.ln_2, l.attn.c_proj, l.mlp.c_proj, ("split", l.attn.c_attn)) for l in layers]
        return base.wte, layers, per
    if mt == "gpt_neox":
        base = model.gpt_neox
        layers = list(base.layers)
        par = cfg.use_parallel_residual
        per = [(l.attention, l.mlp, None if par else l.post_attention_layernorm, l.attention.dense,
                l.mlp.dense_4h_to_h, ("neox", l.attention.query_key_value)) for l in layers]
        return base.embed_in, layers, per
    if mt == "gptj":
        base = model.transformer
        layers = list(base.h)
        per = [(l.attn, l.mlp, None, l.attn.out_proj, l.mlp.fc_out,
                ("sep", (l.attn.q_proj, l.attn.k_proj, l.attn.v_proj))) for l in layers]
        return base.wte, layers, per
    base = model.model
    layers = list(base.layers)
    gem = mt.startswith("gemma3")
    per = []
    for l in layers:
        a = l.self_attn
        per.append((l.post_attention_layernorm if gem else a, l.post_feedforward_layernorm if gem else l.mlp,
                    l.pre_feedforward_layernorm if gem else l.post_attention_layernorm, a.o_proj, l.mlp.down_proj,
                    ("sep", (a.q_proj, a.k_proj, a.v_proj))))
    return base.embed_tokens, layers, per


def metric_value(logits_row, metric):
    import torch

    kind = metric[0]
    if kind == "logit":
        return logits_row[metric[1]]
    if kind == "logit_diff":
        return logits_row[metric[1]] - logits_row[metric[2]]
    lp = torch.log_softmax(logits_row, -1)
    return lp[metric[1]] if kind == "logprob" else torch.exp(lp[metric[1]])


def hf_gradients(model, ids, metric, position=-1) -> dict:
    """{site: gradient (numpy float32, factrace's shape)} and "metric": the value, for one id sequence."""
    import torch

    cfg = model.config
    emb, layers, per = _modules(model)
    L = len(layers)
    H = cfg.num_attention_heads
    t: dict = {}
    hooks = []

    def keep(key):
        def f(x):
            x.retain_grad()
            t[key] = x
        return f

    def out_hook(key):
        def f(mod, args, out):
            keep(key)(out[0] if isinstance(out, (tuple, list)) else out)
        return f

    def in_hook(key):
        def f(mod, args, kwargs):
            keep(key)(args[0] if args else kwargs["hidden_states"])
        return f

    try:
        hooks.append(emb.register_forward_hook(out_hook(("embed", 0))))
        for i, layer in enumerate(layers):
            a, mlp, ln2, o, down, qkv = per[i]
            hooks.append(layer.register_forward_pre_hook(in_hook(("resid_pre", i)), with_kwargs=True))
            hooks.append(layer.register_forward_hook(out_hook(("resid_post", i))))
            hooks.append(a.register_forward_hook(out_hook(("attn_out", i))))
            hooks.append(mlp.register_forward_hook(out_hook(("mlp_out", i))))
            if ln2 is not None:
                hooks.append(ln2.register_forward_pre_hook(in_hook(("resid_mid", i)), with_kwargs=True))
            hooks.append(o.register_forward_pre_hook(in_hook(("z", i)), with_kwargs=True))
            hooks.append(down.register_forward_pre_hook(in_hook(("mlp_post", i)), with_kwargs=True))
            if qkv[0] == "sep":
                for name, mod in zip("qkv", qkv[1]):
                    hooks.append(mod.register_forward_hook(out_hook((name, i))))
            else:
                hooks.append(qkv[1].register_forward_hook(out_hook(("qkv", i))))
        out = model(input_ids=torch.tensor([list(map(int, ids))]), output_attentions=True, use_cache=False)
        for i, a in enumerate(out.attentions):
            keep(("attn", i))(a)
        M = metric_value(out.logits[0, position], metric)
        M.backward()
    finally:
        for h in hooks:
            h.remove()

    def g(key):
        return t[key].grad[0].detach().float().numpy()

    T = len(ids)
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    kv = getattr(cfg, "num_key_value_heads", None) or H
    res = {"metric": float(M.detach()), "embed": g(("embed", 0))}
    for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "resid_mid", "z", "mlp_post", "attn"):
        if (site, 0) in t:
            res[site] = np.stack([g((site, i)) for i in range(L)])
    res["z"] = res["z"].reshape(L, T, H, dh)
    for i in range(L):
        if ("qkv", i) in t:
            gq = g(("qkv", i))
            if per[i][5][0] == "split":  # GPT-2 c_attn: [q | k | v]
                parts = np.split(gq, 3, axis=-1)
            else:  # GPT-NeoX: (T, H, 3, dh)
                v4 = gq.reshape(T, H, 3, dh)
                parts = [v4[:, :, j].reshape(T, H * dh) for j in range(3)]
            for name, p in zip("qkv", parts):
                t[(name + "_np", i)] = p
        else:
            for name in "qkv":
                t[(name + "_np", i)] = g((name, i))
    for name, nh in (("q", H), ("k", kv), ("v", kv)):
        res[name] = np.stack([t[(name + "_np", i)] for i in range(L)]).reshape(L, T, nh, dh)
    return res
