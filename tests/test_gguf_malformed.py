"""Malformed GGUF files: every one must raise GGUFError (naming the path and the problem), never crash
or read out of bounds (run under ASan with FACTRACE_SANITIZE=address for the strongest check)."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import gguf_builders as gb  # noqa: E402
from gguf_builders import GGML_ID, GGUFBuilder, gstr, u32, u64  # noqa: E402

from factrace.errors import GGUFError
from factrace.io.gguf import GGUFFile# noqa: E402


def overwrite(path, data: bytes):
    """Replace the file's contents in place (O_TRUNC rewrites are slow on some file systems)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def open_bytes(tmp_path, data: bytes, name="bad.gguf"):
    path = tmp_path / name
    overwrite(path, data)
    g = GGUFFile(path)
    # if it opened, everything in it must be readable
    for n, info in g.tensors.items():
        g.raw(n)
        if info.type_name in gb.DEQUANT_TYPES:
            g.tensor(n)
    return g


def expect_error(tmp_path, data: bytes, match: str):
    path = tmp_path / "bad.gguf"
    overwrite(path, data)
    with pytest.raises(GGUFError, match=match) as ei:
        GGUFFile(path)
    assert str(path) in str(ei.value)
    return str(ei.value)


def tensor_info(name, ne, ggml_type, offset, n_dims=None):
    nd = len(ne) if n_dims is None else n_dims
    return gstr(name) + u32(nd) + b"".join(u64(d) for d in ne) + u32(ggml_type) + u64(offset)


# ---- truncation ----

@pytest.mark.parametrize("version,alignment", [(3, None), (2, 64)])
def test_truncated_everywhere(tmp_path, version, alignment):
    data, sec = gb.all_types_builder(version=version, alignment=alignment).layout()
    open_bytes(tmp_path, data).close()  # the full file is valid
    path = tmp_path / "cut.gguf"
    path.write_bytes(data)
    for cut in range(len(data) - 1, -1, -1):
        os.truncate(path, cut)  # much faster than rewriting the file
        with pytest.raises(GGUFError) as ei:
            GGUFFile(path)
        msg = str(ei.value)
        assert str(path) in msg
        if sec["metadata"][0] <= cut < sec["tensor_infos"][1] and cut > 0:
            assert "truncated" in msg or "too long" in msg or "cannot fit" in msg, (cut, msg)


def test_truncated_messages_name_section(tmp_path):
    data, sec = gb.all_types_builder().layout()
    assert "version" in expect_error(tmp_path, data[:6], "truncated")
    assert "tensor count" in expect_error(tmp_path, data[:12], "truncated")
    one, sec1 = GGUFBuilder().add_kv("general.name", gb.STRING, "x" * 40).layout()
    m0 = sec1["metadata"][0]
    expect_error(tmp_path, one[:m0 + 5], "metadata count 1 cannot fit")
    expect_error(tmp_path, one[:m0 + 15], "string too long: key of metadata entry 0")
    expect_error(tmp_path, one[:m0 + 22], "truncated: value type of metadata entry 0")
    expect_error(tmp_path, one[:m0 + 30], "truncated: string value of metadata entry 0")
    expect_error(tmp_path, one[:sec1["metadata"][0] + 50], "string too long: string value of metadata entry 0")
    expect_error(tmp_path, data[:sec["tensor_infos"][0] + 3], "truncated: name of tensor info 0")
    expect_error(tmp_path, data[:sec["data"][0] + 10], "runs past the end")


def test_empty_and_tiny(tmp_path):
    expect_error(tmp_path, b"", "empty")
    expect_error(tmp_path, b"GG", "truncated")
    expect_error(tmp_path, b"GGUF", "truncated")


# ---- header ----

def test_bad_magic_and_versions(tmp_path):
    good = GGUFBuilder().build()
    expect_error(tmp_path, b"GGML" + good[4:], "not a GGUF file")
    expect_error(tmp_path, GGUFBuilder(version=1).build(), "version 1 is not supported")
    expect_error(tmp_path, GGUFBuilder(version=4).build(), "unsupported GGUF version 4")
    expect_error(tmp_path, GGUFBuilder(version=0).build(), "unsupported GGUF version 0")
    expect_error(tmp_path, good[:4] + u32(3 << 24) + good[8:], "big-endian")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1, 2**32, 3])
def test_lying_kv_count(tmp_path, count):
    b = GGUFBuilder().add_kv("a", gb.UINT32, 1).add_kv("b", gb.STRING, "x")
    expect_error(tmp_path, b.build(n_kv=count), "cannot fit|truncated")


@pytest.mark.parametrize("count", [2**60, 2**64 - 1, 2])
def test_lying_tensor_count(tmp_path, count):
    b = GGUFBuilder().add_tensor("w", (4,), 0)
    expect_error(tmp_path, b.build(n_tensors=count), "cannot fit|truncated|runs past|too long")


# ---- metadata ----

@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 1000, 2**40])
def test_string_longer_than_file(tmp_path, length):
    b = GGUFBuilder().add_kv_raw(gstr("k") + u32(gb.STRING) + gstr("abc", length=length))
    expect_error(tmp_path, b.build(), "string too long: string value of metadata entry 0")
    b = GGUFBuilder().add_kv_raw(gstr("key", length=length) + u32(gb.UINT8) + b"\x01")
    expect_error(tmp_path, b.build(), "string too long: key of metadata entry 0")


def test_string_without_end_at_eof(tmp_path):
    # the file ends inside the string's bytes
    data, sec = GGUFBuilder().add_kv_raw(gstr("k") + u32(gb.STRING) + u64(10) + b"abc").layout()
    expect_error(tmp_path, data[:sec["metadata"][1]], "string too long")


@pytest.mark.parametrize("vtype", [13, 255, 2**32 - 1])
def test_unknown_value_type(tmp_path, vtype):
    data = GGUFBuilder().add_kv_raw(gstr("weird") + u32(vtype) + u64(0)).build()
    msg = expect_error(tmp_path, data, f"unknown value type {vtype}")
    assert "weird" in msg


def test_unknown_array_element_type(tmp_path):
    data = GGUFBuilder().add_kv_raw(gstr("a") + u32(gb.ARRAY) + u32(77) + u64(1) + b"\0" * 8).build()
    expect_error(tmp_path, data, "unknown array element type 77")


def test_nested_array_rejected(tmp_path):
    inner = u32(gb.UINT8) + u64(2) + b"\1\2"
    data = GGUFBuilder().add_kv_raw(gstr("a") + u32(gb.ARRAY) + u32(gb.ARRAY) + u64(1) + inner).build()
    expect_error(tmp_path, data, "nested arrays are not supported")


@pytest.mark.parametrize("elem", [gb.UINT8, gb.UINT64, gb.STRING, gb.FLOAT64])
@pytest.mark.parametrize("count", [2**60, 2**64 - 1, 2**61 + 1, 100])
def test_lying_array_count(tmp_path, elem, count):
    data = GGUFBuilder().add_kv_raw(gstr("a") + u32(gb.ARRAY) + u32(elem) + u64(count) + b"\0" * 16).build()
    expect_error(tmp_path, data, "array length|truncated|too long")


def test_string_array_element_too_long(tmp_path):
    data = GGUFBuilder().add_kv_raw(gstr("a") + u32(gb.ARRAY) + u32(gb.STRING) + u64(2) + gstr("ok") +
                                    gstr("x", length=2**62)).build()
    expect_error(tmp_path, data, "string too long: string array element")


def test_duplicate_key(tmp_path):
    data = GGUFBuilder().add_kv("k", gb.UINT8, 1).add_kv("j", gb.UINT8, 1).add_kv("k", gb.UINT8, 2).build()
    expect_error(tmp_path, data, "duplicate metadata key 'k'")


def test_invalid_utf8_key(tmp_path):
    data = GGUFBuilder().add_kv_raw(gstr(b"\xff\xfe") + u32(gb.UINT8) + b"\1").build()
    expect_error(tmp_path, data, "metadata key 0 is not valid UTF-8")


# ---- alignment ----

@pytest.mark.parametrize("value", [0, 3, 48, 2**32 - 1])
def test_bad_alignment_value(tmp_path, value):
    data = GGUFBuilder().add_kv("general.alignment", gb.UINT32, value).build()
    expect_error(tmp_path, data, f"power of two, got {value}")


@pytest.mark.parametrize("vtype,value", [(gb.UINT64, 32), (gb.INT32, 32), (gb.STRING, "32")])
def test_bad_alignment_type(tmp_path, vtype, value):
    data = GGUFBuilder().add_kv("general.alignment", vtype, value).build()
    expect_error(tmp_path, data, "general.alignment must be of type uint32")


def test_huge_alignment_data_start_past_end(tmp_path):
    # alignment 2^31: the data section would start at 2 GiB, far past the end of this small file
    data = (b"GGUF" + u32(3) + u64(1) + u64(1) + gb.kv("general.alignment", gb.UINT32, 2**31) +
            tensor_info("w", (4,), 0, 0) + b"\0" * 64)
    expect_error(tmp_path, data, "data section would start at offset 2147483648")


# ---- tensor infos ----

def with_info(info: bytes, data_size=64, kvs=()):
    b = GGUFBuilder()
    for k in kvs:
        b.add_kv_raw(k)
    b.add_tensor("x", (1,), 0, data=b"\0" * data_size, info_raw=info)
    return b.build()


def test_offset_not_aligned(tmp_path):
    expect_error(tmp_path, with_info(tensor_info("w", (4,), 0, 4)), "not a multiple of the alignment 32")


@pytest.mark.parametrize("offset", [64, 2**64 - 32, 2**63])
def test_offset_past_end(tmp_path, offset):
    expect_error(tmp_path, with_info(tensor_info("w", (4,), 0, offset)), "runs past the end")


def test_data_range_overlaps_end(tmp_path):
    # 64 bytes of data, tensor needs 17 floats = 68 bytes
    expect_error(tmp_path, with_info(tensor_info("w", (17,), 0, 0)), "runs past the end")
    # second tensor starting inside the data but ending after it
    b = GGUFBuilder().add_tensor("a", (8,), 0).add_tensor("b", (8,), 0)
    data = b.build()
    expect_error(tmp_path, data[:-4], "tensor 'b'.*runs past the end")


def test_too_many_dims(tmp_path):
    expect_error(tmp_path, with_info(tensor_info("w", (1, 1, 1, 1, 1), 0, 0)), "5 dimensions")
    expect_error(tmp_path, with_info(tensor_info("w", (1,), 0, 0, n_dims=2**31)), "dimensions")


def test_zero_dim(tmp_path):
    expect_error(tmp_path, with_info(tensor_info("w", (4, 0), 0, 0)), "dimension of size 0")


@pytest.mark.parametrize("ne", [(2**32, 2**32), (2**63,), (2**64 - 1,), (2**31, 2**31, 4), (2**62, 2, 2)])
def test_dims_overflow(tmp_path, ne):
    expect_error(tmp_path, with_info(tensor_info("w", ne, 0, 0)), "overflows")


@pytest.mark.parametrize("ne,gt", [((2**40, 2**20), 0), ((2**62,), 1), ((2**30 * 256,), GGML_ID["Q4_K"])])
def test_huge_dims_past_end(tmp_path, ne, gt):
    expect_error(tmp_path, with_info(tensor_info("w", ne, gt, 0)), "runs past the end|overflows")


@pytest.mark.parametrize("gt", [4, 5, 31, 36, 63, 64, 1000, 2**32 - 1])
def test_unknown_tensor_type(tmp_path, gt):
    expect_error(tmp_path, with_info(tensor_info("w", (256,), gt, 0)), f"unknown ggml type {gt}")


@pytest.mark.parametrize("name,ne0", [("Q4_K", 100), ("Q8_0", 48), ("Q6_K", 255), ("IQ2_XS", 32)])
def test_row_not_multiple_of_block(tmp_path, name, ne0):
    msg = expect_error(tmp_path, with_info(tensor_info("w", (ne0, 2), GGML_ID[name], 0)),
                       f"row length {ne0} is not a multiple")
    assert name in msg


def test_duplicate_tensor_names(tmp_path):
    b = GGUFBuilder().add_tensor("a", (4,), 0).add_tensor("b", (4,), 0).add_tensor("a", (4,), 0)
    expect_error(tmp_path, b.build(), "duplicate tensor name 'a'")


def test_tensor_name_too_long(tmp_path):
    info = gstr("w", length=2**62) + u32(1) + u64(4) + u32(0) + u64(0)
    expect_error(tmp_path, with_info(info), "string too long: name of tensor info 0")


def test_invalid_utf8_tensor_name(tmp_path):
    expect_error(tmp_path, with_info(tensor_info(b"\x80abc", (4,), 0, 0)), "tensor name 0 is not valid UTF-8")


def test_directory_and_missing(tmp_path):
    with pytest.raises(GGUFError, match="not a regular file"):
        GGUFFile(tmp_path)
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "missing.gguf")


# ---- random corruption ----

def test_random_byte_flips(tmp_path):
    data, sec = gb.all_types_builder(alignment=64).layout()
    header_end = sec["tensor_infos"][1]
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.gguf"
    opened = failed = 0
    for _ in range(5000):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, header_end))
            buf[pos] = int(rng.integers(0, 256)) if rng.random() < 0.7 else rng.choice([0x00, 0xFF, 0x7F, 0x80])
        if rng.random() < 0.2:
            buf = buf[: int(rng.integers(0, len(buf)))]
        try:
            g = open_bytes(tmp_path, bytes(buf), "fuzz.gguf")
            g.close()
            opened += 1
        except GGUFError as exc:
            assert str(path) in str(exc)
            failed += 1
    assert failed > 100
