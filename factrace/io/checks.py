"""Strict readers of config values: each returns a value of the promised type and range or raises
:class:`~factrace.errors.ConfigError` naming the file (``where``) and the key. The architecture table
(``archs.py``) and the config parser (``config.py``) read every value through these.

Example:
    >>> pos_int(12, "n_layer", "config.json")
    12
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ConfigError


def pos_int(v, key: str, where: str, lo: int = 1, hi: int = 1 << 24) -> int:
    """``v`` as an int in [lo, hi] (JSON booleans are not integers)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
        raise ConfigError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {v!r:.80}")
    return int(v)


def num(v, key: str, where: str, zero_ok: bool = False) -> float:
    """A finite JSON number > 0 (>= 0 with ``zero_ok``)."""
    ok = (not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)
          and (v >= 0 if zero_ok else v > 0))
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be a finite number {'>= 0' if zero_ok else '> 0'}, got {v!r:.80}")
    return float(v)


def opt_dict(c: dict, key: str, where: str) -> dict | None:
    """``c[key]`` when it is a JSON object, None when absent or null."""
    v = c.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: '{key}' must be a JSON object, got {v!r:.80}")
    return v


def opt_str_list(c: dict, key: str, where: str, n: int) -> list | None:
    """``c[key]`` as a list of ``n`` strings (None when absent, null or empty)."""
    v = c.get(key)
    if not v:
        return None
    if not isinstance(v, list) or len(v) != n or not all(isinstance(t, str) for t in v):
        raise ConfigError(f"{where}: '{key}' must be a list of {n} strings, got {v!r:.80}")
    return v


def window(v, key: str, where: str) -> int:
    """A sliding-window size: an integer in [1, 2^30]."""
    return pos_int(v, key, where, hi=1 << 30)


# ---------------------------------------------------------------------------------------------
# rotary tables, exactly as transformers' rope init functions compute them (float32 tensors)

def rope_inv_freq(dim: int, base: float, scaling: dict | None = None, where: str = "config") -> tuple:
    """Inverse frequencies (dim/2,) float32 and the attention scaling factor for a rope config.

    ``scaling`` is the HF ``rope_scaling`` dict (``rope_type``/``type`` of ``default``, ``linear`` or
    ``llama3``); other types raise :class:`ConfigError`.

    Example:
        >>> inv, mscale = rope_inv_freq(64, 10000.0)
        >>> inv.shape, mscale
        ((32,), 1.0)
    """
    f32 = np.float32
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
    inv = (f32(1.0) / (f32(base) ** exps)).astype(f32)
    kind = "default"
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope scaling must be a JSON object, got {scaling!r:.80}")
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv, 1.0

    def pos(key):
        v = scaling.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"{where}: rope scaling '{key}' must be a positive number, got {v!r}")
        return f32(v)

    if kind == "linear":
        return (inv / pos("factor")).astype(f32), 1.0
    if kind == "llama3":
        factor, low, high = pos("factor"), pos("low_freq_factor"), pos("high_freq_factor")
        old = pos("original_max_position_embeddings")
        if high == low:
            raise ConfigError(f"{where}: llama3 rope scaling needs high_freq_factor != low_freq_factor")
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / inv
        inv_l = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * inv_l / factor + smooth * inv_l).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_l).astype(f32), 1.0
    raise ConfigError(f"{where}: rope scaling type '{kind}' is not supported (supported: default, linear, llama3)")


def theta_scaling(rp: dict, where: str):
    """(theta, scaling-or-None) from one rope_parameters dict."""
    if "rope_theta" not in rp:
        raise ConfigError(f"{where}: rope_parameters lacks 'rope_theta'")
    kind = rp.get("rope_type", "default")
    return num(rp["rope_theta"], "rope_theta", where), (rp if kind != "default" else None)


def rope_params(c: dict, where: str, theta_key: str = "rope_theta", default_theta: float = 10000.0):
    """(theta, scaling) from either the classic keys (``theta_key``, ``rope_scaling``) or transformers v5's
    ``rope_parameters``."""
    rp = opt_dict(c, "rope_parameters", where)
    if rp is not None and "rope_theta" in rp:
        return theta_scaling(rp, where)
    theta = c.get(theta_key)
    theta = default_theta if theta is None else num(theta, theta_key, where)
    return theta, opt_dict(c, "rope_scaling", where)
