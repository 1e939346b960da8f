"""csrc/matmul.c through factrace._kernels: products with weights as stored (F32, F16, BF16, GGML blocks).

Every type x regime (few, many, auto) x row count x odd widths x threads x SIMD variant the CPU has, against
float64 numpy on the gguf-py dequantized weights; rows_f32 bit for bit against gguf-py; bad arguments."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gguf_builders import F16_FIELDS, GGML, GGML_ID  # noqa: E402

from factrace import _core  # noqa: E402,F401  (sets OpenBLAS to one thread: factrace's pool owns the threads)
from factrace import _kernels as K  # noqa: E402

gq = pytest.importorskip("gguf.quants")
from gguf.constants import GGMLQuantizationType as GT  # noqa: E402

TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
QUANTIZABLE = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"}  # gguf-py quantizes these; the k-quants get random blocks
ISAS = K.isas()
ROWS = [1, 2, 7, 16, 17, 64, 300]
N_OUT = [1, 3, 37, 130]
PATHS = ["few", "many", "auto"]


@pytest.fixture(autouse=True)
def restore_isa():
    before = K.isa()
    yield
    K.set_isa(before)


@pytest.fixture(scope="module")
def pools():
    return {n: K.Pool(n) for n in (2, 3)}


def n_ins(name):
    """the smallest width and larger ones: vector tails (19, 100) and a multiple of 32 (the kernels that
    dequantize in registers take those)"""
    bs = GGML[GGML_ID[name]][1]
    return [1, 19, 64, 100] if bs == 1 else [bs, 3 * bs] if bs == 32 else [bs, 2 * bs]


def reference(raw, name):
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(gq.dequantize(raw, GT[name]), dtype=np.float32)


def random_blocks(rng, name, n_rows, n_in, scale=0.05):
    """(n_rows, row_bytes) uint8 of valid blocks: random bytes, f16 scales set to finite values"""
    _, bs, ts = GGML[GGML_ID[name]]
    raw = rng.integers(0, 256, size=(n_rows * n_in // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        d = (rng.uniform(0.2, 1.0, raw.shape[0]) * scale * rng.choice([-1, 1], raw.shape[0])).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_rows, -1)


def make_weights(rng, name, n_out, n_in):
    """(raw uint8 (n_out, row_bytes), float32 dequantized (n_out, n_in))"""
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    if name == "F32":
        raw = w.view(np.uint8)
    elif name == "F16":
        raw = w.astype(np.float16).view(np.uint8)
    elif name == "BF16":
        raw = (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    elif name in QUANTIZABLE:
        raw = gq.quantize(w, GT[name])
    else:
        raw = random_blocks(rng, name, n_out, n_in)
    raw = np.ascontiguousarray(raw).reshape(n_out, -1)
    assert raw.shape[1] == K.row_bytes(GGML_ID[name], n_in)
    return raw, reference(raw, name).reshape(n_out, n_in)


def check_close(got, ref64, absref64):
    assert got.dtype == np.float32 and got.shape == ref64.shape
    err = np.abs(got.astype(np.float64) - ref64)
    tol = 1e-5 * absref64 + 1e-30
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, f"{bad.size} values off, worst {np.max(err / tol):.3g} x tolerance"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_matmul(isa, name, pools):
    K.set_isa(isa)
    t = GGML_ID[name]
    rng = np.random.default_rng(t * 7 + len(isa))
    for n_in in n_ins(name):
        for n_out in N_OUT:
            raw, w = make_weights(rng, name, n_out, n_in)
            w64, aw64 = w.astype(np.float64), np.abs(w.astype(np.float64))
            bias = rng.standard_normal(n_out).astype(np.float32)
            for N in ROWS:
                x = rng.standard_normal((N, n_in)).astype(np.float32)
                g = rng.standard_normal((N, n_out)).astype(np.float32)
                x64, g64 = x.astype(np.float64), g.astype(np.float64)
                ref, aref = x64 @ w64.T, np.abs(x64) @ aw64.T
                ref_t, aref_t = g64 @ w64, np.abs(g64) @ aw64
                for i, path in enumerate(PATHS):
                    threads = [1, pools[2], pools[3]][(N + n_out + i) % 3]  # each combination somewhere
                    b = bias if (N + i) % 2 else None
                    out = K.matmul(x, raw, t, n_out, n_in, bias=b, threads=threads, path=path)
                    check_close(out, ref + (b if b is not None else 0), aref + (np.abs(b) if b is not None else 0))
                    out_t = K.matmul_t(g, raw, t, n_out, n_in, threads=threads, path=path)
                    check_close(out_t, ref_t, aref_t)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("path", PATHS)
def test_threads_argument_as_int(threads, path):
    rng = np.random.default_rng(threads)
    raw, w = make_weights(rng, "Q4_K", 37, 512)
    x = rng.standard_normal((17, 512)).astype(np.float32)
    out = K.matmul(x, raw, GGML_ID["Q4_K"], 37, 512, threads=threads, path=path)
    check_close(out, x.astype(np.float64) @ w.T.astype(np.float64), np.abs(x.astype(np.float64)) @ np.abs(w.T))
    g = rng.standard_normal((17, 37)).astype(np.float32)
    out_t = K.matmul_t(g, raw, GGML_ID["Q4_K"], 37, 512, threads=threads, path=path)
    check_close(out_t, g.astype(np.float64) @ w.astype(np.float64), np.abs(g.astype(np.float64)) @ np.abs(w))


@pytest.mark.parametrize("name", TYPES)
def test_larger_shapes(name, pools):
    """a GPT-2-like width: several chunks per thread, both regimes"""
    t = GGML_ID[name]
    rng = np.random.default_rng(100 + t)
    n_out, n_in = 250, 768
    raw, w = make_weights(rng, name, n_out, n_in)
    for N, path in [(1, "few"), (16, "few"), (16, "many"), (70, "auto")]:
        x = rng.standard_normal((N, n_in)).astype(np.float32)
        out = K.matmul(x, raw, t, n_out, n_in, threads=pools[2], path=path)
        check_close(out, x.astype(np.float64) @ w.T.astype(np.float64), np.abs(x.astype(np.float64)) @ np.abs(w.T))
        g = rng.standard_normal((N, n_out)).astype(np.float32)
        out_t = K.matmul_t(g, raw, t, n_out, n_in, threads=pools[2], path=path)
        check_close(out_t, g.astype(np.float64) @ w.astype(np.float64), np.abs(g.astype(np.float64)) @ np.abs(w))


def finite_random_raw(rng, name, n_out, n_in):
    """random bytes with every f16 field (scales, or the F16 values) a random finite half: subnormals and
    large values included"""
    _, bs, ts = GGML[GGML_ID[name]]
    if name in ("F32", "F16", "BF16"):
        h = rng.integers(0, 1 << 16, size=(n_out, n_in), dtype=np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= 0xBFFF  # no inf/NaN halves (exponent 11111 -> 01111)
        if name == "F16":
            return h.view(np.uint8)
        b = h & 0x7F7F  # BF16 / F32: keep the exponent finite
        return b.view(np.uint8) if name == "BF16" else (b.astype(np.uint32) << 16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n_out * n_in // bs, ts), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        h = rng.integers(0, 1 << 16, size=raw.shape[0], dtype=np.uint16)
        h[(h & 0x7C00) == 0x7C00] &= 0xBFFF
        raw[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n_out, -1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_products_use_exact_weights(isa, name):
    """one-hot rows of x pick single weights: every regime must return them bit for bit (a product with 1
    and sums of zeros round nothing), so each kernel multiplies exactly the dequantized values"""
    K.set_isa(isa)
    t = GGML_ID[name]
    bs = GGML[t][1]
    n_in = 64 if bs == 1 else 2 * bs
    n_out = 9
    rng = np.random.default_rng(t + 11)
    raw = finite_random_raw(rng, name, n_out, n_in)
    w = reference(raw, name).reshape(n_out, n_in)
    assert np.isfinite(w).all()
    eye = np.eye(n_in, dtype=np.float32)
    cols = rng.choice(n_in, 4, replace=False)
    for x in (eye[cols[:1]], eye[cols[:2]], eye[cols], eye):  # 1, 2, 4 rows: in registers; all: buffer, sgemm
        for path in PATHS:
            got = K.matmul(x, raw, t, n_out, n_in, threads=2, path=path)
            assert np.array_equal(got, (x @ w.T.astype(np.float64)).astype(np.float32)), (x.shape, path)
    g_eye = np.eye(n_out, dtype=np.float32)
    for g in (g_eye[:1], g_eye[3:5], g_eye):
        for path in PATHS:
            got = K.matmul_t(g, raw, t, n_out, n_in, threads=2, path=path)
            assert np.array_equal(got, (g @ w.astype(np.float64)).astype(np.float32)), (g.shape, path)


def assert_bits_equal(a, b):
    """float32 arrays equal bit for bit; NaNs at the same places (payloads may differ)"""
    assert a.dtype == np.float32 and b.dtype == np.float32 and a.shape == b.shape
    na, nb = np.isnan(a), np.isnan(b)
    assert np.array_equal(na, nb)
    ua, ub = a.view(np.uint32)[~na], b.view(np.uint32)[~nb]
    bad = np.flatnonzero(ua != ub)
    assert bad.size == 0, f"{bad.size} values differ, first {ua[bad[:4]]} vs {ub[bad[:4]]}"


SPECIAL_F16 = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0xFE01, 0x7BFF, 0xFBFF, 0x0001, 0x8001, 0x03FF, 0x0400, 0x0000,
               0x8000, 0x3C00, 0xBC00]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("name", TYPES)
def test_rows_f32_bit_identical(isa, name):
    K.set_isa(isa)
    t = GGML_ID[name]
    _, bs, ts = GGML[t]
    rng = np.random.default_rng(t)
    n_in = max(bs, 2 * bs if bs > 1 else 77)
    n_out = 9
    # fully random bytes: scales (and F16/BF16/F32 values) include inf, NaN, subnormals
    raw = rng.integers(0, 256, size=(n_out, n_in // bs * ts), dtype=np.uint8)
    if name == "F16":
        raw[0, :2 * len(SPECIAL_F16)] = np.array(SPECIAL_F16, dtype="<u2").view(np.uint8)
    elif name in F16_FIELDS:
        blocks = raw.reshape(-1, ts)
        for off in F16_FIELDS[name]:
            blocks[:len(SPECIAL_F16), off:off + 2] = np.array(SPECIAL_F16, dtype="<u2").view(np.uint8).reshape(-1, 2)
    ref = reference(raw, name).reshape(n_out, n_in)
    assert_bits_equal(K.rows_f32(raw, t, n_out, n_in, 0, n_out), ref)
    assert_bits_equal(K.rows_f32(raw, t, n_out, n_in, 2, 7), ref[2:7])
    assert K.rows_f32(raw, t, n_out, n_in, 3, 3).shape == (0, n_in)
    # realistic blocks too
    raw2, w2 = make_weights(rng, name, 5, n_in)
    assert_bits_equal(K.rows_f32(raw2, t, 5, n_in, 0, 5), w2)
    if name == "F16":  # signaling NaN payloads are kept as is (quant.c, numpy), not quieted
        h = np.array([0x7C01, 0xFD55, 0x7E00, 0xFC00] * 5, dtype="<u2")
        got = K.rows_f32(h.view(np.uint8), t, 1, h.size, 0, 1)
        assert np.array_equal(got.view(np.uint32).ravel(), np.array([quant_f16_bits(v) for v in h], np.uint32))


def quant_f16_bits(h):
    """quant.c's float32 bits of an inf/NaN half (exponent all ones): payload kept as is"""
    return ((int(h) & 0x8000) << 16) | 0x7F800000 | ((int(h) & 0x3FF) << 13)


@pytest.mark.parametrize("isa", ISAS)
def test_nonfinite_weights_propagate(isa):
    """an inf weight gives inf/NaN where the reference has it, not elsewhere (no padding row leaks)"""
    K.set_isa(isa)
    w = np.ones((5, 33), dtype=np.float32)
    w[4, 7] = np.inf
    x = np.ones((3, 33), dtype=np.float32)
    for path in PATHS:
        out = K.matmul(x, w.view(np.uint8), 0, 5, 33, path=path)
        assert np.isinf(out[:, 4]).all() and np.isfinite(out[:, :4]).all()
        out_t = K.matmul_t(np.ones((3, 5), np.float32), w.view(np.uint8), 0, 5, 33, path=path)
        assert np.isinf(out_t[:, 7]).all() and np.isfinite(np.delete(out_t, 7, axis=1)).all()


@pytest.mark.parametrize("name", ["F32", "BF16", "Q4_0", "Q6_K"])
def test_deterministic(name):
    """the few-rows regime gives the same bits for any thread count; every regime the same bits run to run"""
    rng = np.random.default_rng(3)
    raw, _ = make_weights(rng, name, 203, 256)
    t = GGML_ID[name]
    for N in (1, 3, 16, 70):
        x = rng.standard_normal((N, 256)).astype(np.float32)
        g = rng.standard_normal((N, 203)).astype(np.float32)
        few = [K.matmul(x, raw, t, 203, 256, threads=n, path="few") for n in (1, 2, 3, 2)]
        assert all(np.array_equal(few[0], f) for f in few[1:])
        for path in ("many", "auto"):
            a, b = (K.matmul(x, raw, t, 203, 256, threads=2, path=path) for _ in range(2))
            assert np.array_equal(a, b)
        for path in PATHS:
            a, b = (K.matmul_t(g, raw, t, 203, 256, threads=3, path=path) for _ in range(2))
            assert np.array_equal(a, b)


def test_empty_and_degenerate():
    raw = np.zeros((3, K.row_bytes(GGML_ID["Q8_0"], 32)), np.uint8)
    assert K.matmul(np.zeros((0, 32), np.float32), raw, 8, 3, 32).shape == (0, 3)
    assert K.matmul_t(np.zeros((0, 3), np.float32), raw, 8, 3, 32).shape == (0, 32)
    out = K.matmul(np.ones((2, 0), np.float32), b"", 0, 3, 0, bias=np.arange(3, dtype=np.float32))
    assert np.array_equal(out, np.tile(np.arange(3, dtype=np.float32), (2, 1)))
    assert np.array_equal(K.matmul_t(np.ones((2, 0), np.float32), b"", 0, 0, 4), np.zeros((2, 4), np.float32))
    # F32 data at an odd address: copied, not read in place
    buf = np.zeros(4 * 6 * 5 + 1, np.uint8)
    w = np.arange(30, dtype=np.float32).reshape(6, 5)
    buf[1:] = w.view(np.uint8).ravel()
    x = np.ones((2, 5), np.float32)
    for path in PATHS:
        assert np.array_equal(K.matmul(x, buf[1:], 0, 6, 5, path=path), x @ w.T)
        assert np.array_equal(K.matmul_t(np.ones((2, 6), np.float32), buf[1:], 0, 6, 5, path=path),
                              np.ones((2, 6), np.float32) @ w)


def test_bad_arguments():
    t = GGML_ID["Q4_0"]
    rb = K.row_bytes(t, 64)
    raw = np.zeros((4, rb), np.uint8)
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="unknown ggml type"):
        K.matmul(x, raw, 5, 4, 64)
    with pytest.raises(ValueError, match="unknown ggml type"):
        K.matmul(x, raw, -1, 4, 64)
    with pytest.raises(ValueError, match="not supported"):
        K.matmul(x, raw, GGML_ID.get("Q8_1", 9), 4, 64)
    with pytest.raises(ValueError, match="multiple of"):
        K.matmul(np.zeros((2, 48), np.float32), raw, t, 4, 48)
    with pytest.raises(ValueError, match="bytes"):
        K.matmul(x, raw[:3], t, 4, 64)
    with pytest.raises(ValueError, match="bytes"):
        K.matmul(x, raw, t, 5, 64)
    with pytest.raises(ValueError, match=">= 0"):
        K.matmul(x, raw, t, -4, 64)
    with pytest.raises(TypeError, match="float32"):
        K.matmul(x.astype(np.float64), raw, t, 4, 64)
    with pytest.raises(TypeError, match="float32"):
        K.matmul([[0.0] * 64], raw, t, 4, 64)
    with pytest.raises(ValueError, match="dimension"):
        K.matmul(np.zeros(64, np.float32), raw, t, 4, 64)
    with pytest.raises(ValueError, match="columns"):
        K.matmul(np.zeros((2, 32), np.float32), raw, t, 4, 64)
    with pytest.raises(ValueError, match="columns"):
        K.matmul(x, raw, t, 4, 64, bias=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32"):
        K.matmul(x, raw, t, 4, 64, bias=np.zeros(4))
    for bad in (0, -1, 5000):
        with pytest.raises(ValueError, match="threads"):
            K.matmul(x, raw, t, 4, 64, threads=bad)
    with pytest.raises(TypeError, match="threads"):
        K.matmul(x, raw, t, 4, 64, threads="2")
    with pytest.raises(ValueError, match="path"):
        K.matmul(x, raw, t, 4, 64, path="fast")
    with pytest.raises(ValueError, match="columns"):
        K.matmul_t(np.zeros((2, 5), np.float32), raw, t, 4, 64)
    with pytest.raises(ValueError, match="path"):
        K.matmul_t(np.zeros((2, 4), np.float32), raw, t, 4, 64, path="")
    with pytest.raises(ValueError, match="out of range"):
        K.rows_f32(raw, t, 4, 64, 3, 2)
    with pytest.raises(ValueError, match="out of range"):
        K.rows_f32(raw, t, 4, 64, 0, 5)
    with pytest.raises(ValueError):
        K.row_bytes(t, 33)
    with pytest.raises(ValueError):
        K.set_isa("sse9")
    with pytest.raises(ValueError):
        K.Pool(0)
    # non-contiguous x is accepted (copied)
    xs = np.zeros((2, 128), np.float32)[:, ::2]
    assert K.matmul(xs, raw, t, 4, 64).shape == (2, 4)


def test_isa_hooks():
    assert ISAS[-1] == "baseline" and K.isa() in ISAS
    for isa in ISAS:
        K.set_isa(isa)
        assert K.isa() == isa
    code = "from factrace import _kernels as K; print(K.isa())"
    env = dict(os.environ, FACTRACE_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "baseline"
    env["FACTRACE_ISA"] = "nonsense"  # ignored: the best supported variant
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ISAS[0]


def test_openblas_single_threaded_after_import():
    code = ("from factrace import _kernels; from factrace import _core; "
            "print(_core.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_crossover_table():
    for name in TYPES:
        for tr in (False, True):
            assert 1 <= K.crossover(GGML_ID[name], tr) <= 100000


def test_pools_from_many_python_threads():
    """many tiny loops (2 to 12 chunks) from several Python threads, each with its own pool; sgemm inside pool
    threads; every result checked"""
    rng = np.random.default_rng(5)
    cases = []
    for n_out in (8, 48):
        raw, w = make_weights(rng, "Q8_0", n_out, 64)
        for n in (1, 3, 100):
            x = rng.standard_normal((n, 64)).astype(np.float32)
            g = rng.standard_normal((n, n_out)).astype(np.float32)
            cases.append((raw, n_out, x, g, x.astype(np.float64) @ w.T.astype(np.float64),
                          g.astype(np.float64) @ w.astype(np.float64)))
    errors = []

    def work(seed):
        try:
            pool = K.Pool(2 + seed % 2)
            for i in range(300):
                raw, n_out, x, g, ref, ref_t = cases[(i + seed) % len(cases)]
                path = PATHS[i % 3]
                out = K.matmul(x, raw, 8, n_out, 64, threads=pool, path=path)
                out_t = K.matmul_t(g, raw, 8, n_out, 64, threads=pool, path=path)
                if not (np.allclose(out, ref, rtol=1e-4, atol=1e-4) and np.allclose(out_t, ref_t, rtol=1e-4, atol=1e-4)):
                    errors.append((seed, i))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []


def test_pools_created_per_call_from_many_python_threads():
    rng = np.random.default_rng(6)
    raw, w = make_weights(rng, "Q4_0", 40, 64)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    bad = []

    def work(seed):
        for i in range(50):
            out = K.matmul(x, raw, 2, 40, 64, threads=2 + (i + seed) % 2, path=PATHS[i % 3])
            if not np.allclose(out, ref, rtol=1e-4, atol=1e-4):
                bad.append((seed, i))

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert bad == []


def test_pool_in_use_is_refused():
    pool = K.Pool(2)
    rng = np.random.default_rng(1)
    raw, _ = make_weights(rng, "F32", 2048, 1024)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    seen = []

    def other():
        for _ in range(50):
            try:
                K.matmul(x, raw, 0, 2048, 1024, threads=pool)
            except RuntimeError as e:
                seen.append(str(e))

    th = threading.Thread(target=other)
    th.start()
    for _ in range(50):
        try:
            K.matmul(x, raw, 0, 2048, 1024, threads=pool)
        except RuntimeError as e:
            seen.append(str(e))
    th.join()
    assert all("in use" in s for s in seen)  # refused or serialized; never a crash
