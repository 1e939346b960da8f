"""An independent implementation of ROME's causal-tracing algorithm with transformers + torch forward
hooks (batch of 1 clean + `samples` corrupted rows per cell, noise added to the token-embedding output,
states patched from the clean row), used by the live tests and by benchmarks/trace.py."""
import numpy as np


def _untuple(x):
    return x[0] if isinstance(x, tuple) else x


def _layers(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    if hasattr(model, "gpt_neox"):
        return model.gpt_neox.layers
    return model.model.layers


def _module(model, layer, kind):
    blk = _layers(model)[layer]
    if kind == "hidden":
        return blk
    if kind == "mlp":
        return blk.mlp
    for name in ("attn", "self_attn", "attention"):
        if hasattr(blk, name):
            return getattr(blk, name)


def trace_with_patch(model, ids, states, answer, span, noise):
    """Probability of `answer` at the last position averaged over the corrupted rows; `states` is a list
    of (position, layer, kind) restored from the clean row 0; `noise` (S, e-b, d) float64 is added to
    the embedding output of rows 1..S at positions b..e-1."""
    import torch

    S = noise.shape[0]
    b, e = span
    inp = torch.tensor(np.tile(np.asarray(ids, np.int64), (S + 1, 1)))
    hooks = []

    def embed_hook(mod, args, out):
        out[1:, b:e] += torch.from_numpy(noise)
        return out

    hooks.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    by_mod = {}
    for t, l, kind in states:
        by_mod.setdefault((l, kind), []).append(t)
    for (l, kind), ts in by_mod.items():
        def hook(mod, args, out, ts=ts):
            h = _untuple(out)
            for t in ts:
                h[1:, t] = h[0, t]
            return out
        hooks.append(_module(model, l, kind).register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=inp, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    probs = torch.softmax(logits[1:, -1, :], dim=1).mean(dim=0)[answer]
    return float(probs)


def trace(model, ids, span, kind, window, noise):
    """(T, L) scores, low_score, high_score, answer with ROME's loops (every cell a full forward)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor(np.asarray(ids, np.int64)[None]), use_cache=False).logits
    p = torch.softmax(logits[0, -1], -1)
    answer = int(p.argmax())
    high = float(p[answer])
    low = trace_with_patch(model, ids, [], answer, span, noise)
    L = len(_layers(model))
    T = len(ids)
    scores = np.zeros((T, L))
    for t in range(T):
        for l in range(L):
            if kind == "hidden":
                states = [(t, l, "hidden")]
            else:
                states = [(t, j, kind) for j in range(max(0, l - window // 2), min(L, l - (-window // 2)))]
            scores[t, l] = trace_with_patch(model, ids, states, answer, span, noise)
    return scores, low, high, answer
