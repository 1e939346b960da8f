"""Reading well-formed GGUF files written by gguf-py's GGUFWriter and by tests/gguf_builders.py."""
import os
import pathlib
import sys
import threading

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gguf_builders as gb  # noqa: E402
from gguf_builders import GGML_ID, GGUFBuilder  # noqa: E402

from factrace.errors import GGUFError
from factrace.io.gguf import GGUFFile, TensorInfo, dequantize, type_name# noqa: E402

EXPECTED_SCALARS = {
    "t.u8": (255, "uint8"), "t.i8": (-128, "int8"), "t.u16": (65535, "uint16"), "t.i16": (-32768, "int16"),
    "t.u32": (2**32 - 1, "uint32"), "t.i32": (-2**31, "int32"), "t.f32": (1.5, "float32"),
    "t.bool_t": (True, "bool"), "t.bool_f": (False, "bool"), "t.str": ("héllo ✓", "string"),
    "t.str_empty": ("", "string"), "t.u64": (2**64 - 1, "uint64"), "t.i64": (-2**63, "int64"),
    "t.f64": (-2.25e300, "float64"),
}


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("alignment", [None, 32, 64, 256])
def test_builder_all_types(tmp_path, version, alignment):
    b = gb.all_types_builder(version=version, alignment=alignment)
    data, sec = b.layout()
    path = tmp_path / "all.gguf"
    path.write_bytes(data)
    with GGUFFile(path) as g:
        assert g.version == version
        assert g.alignment == (alignment or 32)
        assert g.path == str(path)
        for key, (val, vt) in EXPECTED_SCALARS.items():
            assert g.metadata[key] == val and type(g.metadata[key]) is type(val), key
            assert g.metadata_types[key] == vt
        assert g.metadata["general.architecture"] == "llama"
        for vt, vals in [(gb.UINT8, [0, 1, 255]), (gb.INT8, [-1, 2]), (gb.UINT16, [7]), (gb.INT16, [-7, 8]),
                         (gb.UINT32, [1, 2, 3]), (gb.INT32, [-5]), (gb.FLOAT32, [0.5, -1.25]),
                         (gb.BOOL, [True, False, True]), (gb.UINT64, [2**64 - 1]), (gb.INT64, [-2**63, 5]),
                         (gb.FLOAT64, [3.5])]:
            key = f"t.arr_{gb.VALUE_TYPE_NAME[vt]}"
            arr = g.metadata[key]
            assert isinstance(arr, np.ndarray) and arr.dtype == gb.NUMPY_DTYPE[vt], key
            assert arr.tolist() == vals, key
            assert g.metadata_types[key] == f"array[{gb.VALUE_TYPE_NAME[vt]}]"
        assert g.metadata["t.arr_string"] == ["a", "", "ü"]
        assert g.metadata["t.arr_empty"].shape == (0,) and g.metadata["t.arr_empty"].dtype == np.int32
        # tensors: shape reversed, offsets aligned, raw bytes exact, data section aligned
        assert list(g.tensors) == ["f32", "f16", "q8", "q4k", "q6k"]
        assert sec["data"][0] % g.alignment == 0
        expect_shapes = {"f32": (3, 8), "f16": (5,), "q8": (2, 64), "q4k": (2, 1, 256), "q6k": (512,)}
        for t, info in zip(b.tensors, g.tensors.values()):
            assert isinstance(info, TensorInfo)
            assert info.shape == expect_shapes[info.name]
            assert info.ggml_type == t["type"] and info.type_name == type_name(t["type"])
            assert info.offset % g.alignment == 0 and info.nbytes == len(t["data"])
            raw = g.raw(info.name)
            assert raw.dtype == np.uint8 and raw.tobytes() == t["data"]
            x = g.tensor(info.name)
            assert x.dtype == np.float32 and x.shape == info.shape and x.flags.c_contiguous
            ref = dequantize(t["data"], t["type"], info.n_elements).reshape(info.shape)
            assert np.array_equal(x.view(np.uint32), ref.view(np.uint32))


def test_tensor_is_fresh_copy(tmp_path):
    path = GGUFBuilder().add_tensor("w", (4, 2), 0, data=np.arange(8, dtype="<f4").tobytes()) \
        .write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        a = g.tensor("w")
        assert a.flags.owndata and a.flags.writeable and a.base is None
        assert a.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        a[:] = -1
        assert g.tensor("w").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
        r = g.raw("w")
        assert r.flags.owndata and r.base is None
    # arrays stay valid after close
    assert a.sum() == -8


def test_close_and_errors_after_close(tmp_path):
    path = GGUFBuilder().add_tensor("w", (4,), 0).write(tmp_path / "a.gguf")
    g = GGUFFile(pathlib.Path(path))
    g.close()
    g.close()
    with pytest.raises(GGUFError, match="closed"):
        g.tensor("w")
    with pytest.raises(KeyError, match="nope"):
        GGUFFile(path).tensor("nope")


def test_no_tensors_no_metadata(tmp_path):
    for alignment in (None, 64):
        path = GGUFBuilder(alignment=alignment).write(tmp_path / "empty.gguf")
        with GGUFFile(path) as g:
            assert g.tensors == {}
            assert set(g.metadata) == ({"general.alignment"} if alignment else set())


def test_scalar_tensor_and_4d(tmp_path):
    b = GGUFBuilder()
    b.add_tensor("s", (), 0, data=np.float32(2.5).tobytes())
    b.add_tensor("w4", (32, 2, 3, 4), GGML_ID["Q8_0"])
    path = b.write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        assert g.tensors["s"].shape == () and g.tensor("s") == np.float32(2.5)
        assert g.tensor("w4").shape == (4, 3, 2, 32)


def test_unsupported_tensor_type_raw_only(tmp_path):
    path = GGUFBuilder().add_tensor("iq", (256, 2), GGML_ID["IQ2_XS"]).add_tensor("q8k", (256,), GGML_ID["Q8_K"]) \
        .write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        assert g.tensors["iq"].type_name == "IQ2_XS"
        assert g.raw("iq").size == 2 * 74
        with pytest.raises(GGUFError, match=r"IQ2_XS.*not supported") as ei:
            g.tensor("iq")
        assert str(path) in str(ei.value)
        with pytest.raises(GGUFError, match="Q8_K"):
            g.tensor("q8k")


def test_invalid_utf8_value_surrogateescape(tmp_path):
    b = GGUFBuilder()
    b.add_kv_raw(gb.gstr("bad.str") + gb.u32(gb.STRING) + gb.gstr(b"a\xffb"))
    b.add_kv_raw(gb.gstr("bad.arr") + gb.u32(gb.ARRAY) + gb.u32(gb.STRING) + gb.u64(1) + gb.gstr(b"\xc3"))
    path = b.write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        assert g.metadata["bad.str"].encode("utf-8", "surrogateescape") == b"a\xffb"
        assert g.metadata["bad.arr"][0].encode("utf-8", "surrogateescape") == b"\xc3"


def test_large_string_array(tmp_path):
    toks = [f"tok{i}" for i in range(20000)] + ["<0x0A>", "▁the", ""]
    path = GGUFBuilder().add_kv("tokenizer.ggml.tokens", gb.ARRAY, toks, gb.STRING).write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        assert g.metadata["tokenizer.ggml.tokens"] == toks


def test_threads_share_a_file(tmp_path):
    b = GGUFBuilder()
    for i in range(8):
        b.add_tensor(f"w{i}", (256, 64), GGML_ID["Q4_K"])
    path = b.write(tmp_path / "a.gguf")
    with GGUFFile(path) as g:
        expect = {n: g.tensor(n) for n in g.tensors}
        results, errors = {}, []

        def work(n):
            try:
                for _ in range(5):
                    results[n] = g.tensor(n)
            except Exception as exc:  # pragma: no cover
                errors.append(exc)

        ts = [threading.Thread(target=work, args=(n,)) for n in g.tensors]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors
        for n in expect:
            assert np.array_equal(results[n].view(np.uint32), expect[n].view(np.uint32))


# ---- files written by gguf-py ----

@pytest.mark.parametrize("alignment", [None, 64])
def test_ggufwriter_file(tmp_path, alignment):
    gguf = pytest.importorskip("gguf")
    from gguf.constants import GGMLQuantizationType as Q

    path = tmp_path / "w.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("k.u8", 200)
    w.add_int8("k.i8", -100)
    w.add_uint16("k.u16", 60000)
    w.add_int16("k.i16", -30000)
    w.add_uint32("k.u32", 4000000000)
    w.add_int32("k.i32", -2000000000)
    w.add_float32("k.f32", 0.1)
    w.add_uint64("k.u64", 2**63 + 5)
    w.add_int64("k.i64", -2**62)
    w.add_float64("k.f64", 0.1)
    w.add_bool("k.bool", True)
    w.add_string("k.str", "ünïcode")
    w.add_array("k.arr_int", [1, 2, 3])
    w.add_array("k.arr_float", [0.5, 1.5])
    w.add_array("k.arr_str", ["x", "yy", ""])
    w.add_array("k.arr_bool", [True, False])
    rng = np.random.default_rng(0)
    tensors = {
        "f32": (rng.normal(size=(3, 5)).astype(np.float32), None, None),
        "f16": (rng.normal(size=(4, 6)).astype(np.float16), None, None),
    }
    for name, qt, shape in [("q4_0", Q.Q4_0, (2, 64)), ("q5_1", Q.Q5_1, (3, 32)), ("q2k", Q.Q2_K, (2, 256)),
                            ("q3k", Q.Q3_K, (1, 256)), ("q5k", Q.Q5_K, (2, 256)), ("q6k", Q.Q6_K, (1, 512)),
                            ("bf16", Q.BF16, (2, 8))]:
        bs, ts = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(shape[0], shape[1] // bs * ts), dtype=np.uint8)
        tensors[name] = (raw, qt, shape)
    for name, (arr, qt, shape) in tensors.items():
        if qt is None:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, arr, raw_dtype=qt)  # byte-shaped uint8 rows
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = gguf.GGUFReader(str(path))
    with GGUFFile(path) as g:
        assert g.version == 3 and g.alignment == (alignment or 32)
        assert g.metadata["general.architecture"] == "llama"
        assert g.metadata["k.u8"] == 200 and g.metadata["k.i8"] == -100 and g.metadata["k.u16"] == 60000
        assert g.metadata["k.i16"] == -30000 and g.metadata["k.u32"] == 4000000000
        assert g.metadata["k.i32"] == -2000000000 and g.metadata["k.u64"] == 2**63 + 5
        assert g.metadata["k.i64"] == -2**62 and g.metadata["k.f64"] == 0.1
        assert g.metadata["k.f32"] == float(np.float32(0.1)) and g.metadata["k.bool"] is True
        assert g.metadata["k.str"] == "ünïcode"
        assert g.metadata["k.arr_int"].tolist() == [1, 2, 3]
        assert g.metadata["k.arr_float"].tolist() == [0.5, 1.5]
        assert g.metadata["k.arr_str"] == ["x", "yy", ""]
        assert g.metadata["k.arr_bool"].tolist() == [True, False]
        assert set(g.metadata) == {f.name for f in reader.fields.values() if not f.name.startswith("GGUF.")}
        for rt in reader.tensors:
            info = g.tensors[rt.name]
            assert info.type_name == rt.tensor_type.name
            assert info.shape == tuple(int(d) for d in reversed(rt.shape))
            assert info.nbytes == rt.n_bytes
            assert g.raw(rt.name).tobytes() == np.asarray(rt.data).tobytes()
            with np.errstate(all="ignore"):  # random scales include inf/nan
                ref = np.asarray(gguf.quants.dequantize(rt.data, rt.tensor_type), dtype=np.float32)
            mine = g.tensor(rt.name)
            assert mine.shape == info.shape
            nan = np.isnan(ref.reshape(-1))
            assert np.array_equal(np.isnan(mine.reshape(-1)), nan)
            assert np.array_equal(mine.reshape(-1).view(np.uint32)[~nan], ref.reshape(-1).view(np.uint32)[~nan])
        np.testing.assert_array_equal(g.tensor("f32"), tensors["f32"][0])
        np.testing.assert_array_equal(g.tensor("f16"), tensors["f16"][0].astype(np.float32))
