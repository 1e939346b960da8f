"""factrace.io.gguf_tokenizer: ids equal to transformers' GGUF tokenizer.

* synthetic metadata (always run): byte-level BPE and SentencePiece-style vocabularies;
* real packaged models vs. committed fixtures (tests/fixtures/tokenizer/<model>.json, made by
  tests/make_tokenizer_fixtures.py): no transformers needed, skipped when the package is missing;
* live comparison with transformers (marked ``oracle``).

Metadata is read with gguf-py's ``GGUFReader`` as a stand-in for ``factrace.io.gguf.GGUFFile`` (which is used only
when gguf-py is missing).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

tokenizers = pytest.importorskip("tokenizers")

from factrace.io import packaged# noqa: E402
from factrace.io.gguf_tokenizer import build_tokenizer, load_tokenizer, special_tokens# noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
MODELS = ["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"]

EXTRA_PROMPTS = [
    "The Eiffel Tower is located in the city of Paris.",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>",
    "x" * 300,
    "   \n \t \n   ",
    "1 12 123 1234 12345  1  22   333",
    "Grüße aus Köln ½ ¾ ™ © ∑ ∫ ≠",
    "🤖🧠💡 " * 5,
]


def _gguf_py_metadata(path: Path) -> dict:
    """Metadata via gguf-py's GGUFReader (the stand-in reader; 5-15 s per real model), or via
    factrace.io.gguf when gguf-py is not installed."""
    try:
        import gguf
    except ImportError:
        try:
            from factrace.io.gguf import GGUFFile
        except ImportError:
            pytest.skip("neither gguf-py nor factrace.io.gguf available")
        return dict(GGUFFile(str(path)).metadata)
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@functools.lru_cache(maxsize=None)
def _metadata(name: str) -> dict:
    return _gguf_py_metadata(packaged.resolve(name))


@functools.lru_cache(maxsize=None)
def _tokenizer(name: str):
    return build_tokenizer(_metadata(name))


def _need(name: str):
    if not packaged.is_installed(name):
        pytest.skip(f"{name} not installed ({packaged.KNOWN[name].pip})")


# ---------------------------------------------------------------- synthetic metadata


def _gpt2_meta(pre="gpt-2", add_bos=None):
    from factrace.io.gguf_tokenizer import _bytes_to_unicode

    chars = sorted(set(_bytes_to_unicode().values()))
    tokens = ["<|endoftext|>"] + chars + ["Ġh", "Ġhe", "ll", "llo", "Ġhello", "12", "<think>"]
    merges = ["Ġ h", "Ġh e", "l l", "ll o", "Ġhe llo", "1 2"]
    types = [3] + [1] * (len(tokens) - 2) + [4]
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if add_bos is not None:
        md["tokenizer.ggml.add_bos_token"] = add_bos
    return md


def test_byte_level_synthetic():
    md = _gpt2_meta()
    tok = build_tokenizer(md)
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    ids = tok.encode(" hello<|endoftext|>x<think>").ids
    assert ids == [vocab["Ġhello"], 0, vocab["x"], vocab["<think>"]]
    assert tok.decode(ids, skip_special_tokens=False) == " hello<|endoftext|>x<think>"
    assert tok.decode(ids, skip_special_tokens=True) == " hellox<think>"
    sp = special_tokens(md)
    assert (sp.bos_id, sp.eos_id, sp.add_bos, sp.add_eos) == (0, 0, False, False)
    # gpt-2 regex keeps digit runs together, qwen2 splits digits one by one
    assert tok.encode("12").ids == [vocab["12"]]
    assert build_tokenizer(_gpt2_meta(pre="qwen2")).encode("12").ids == [vocab["1"], vocab["2"]]


def test_byte_level_add_bos():
    tok, sp = load_tokenizer(_gpt2_meta(add_bos=True))
    assert sp.add_bos
    assert tok.encode("hello").ids[0] == 0


def _spm_meta(arch="llama", add_bos=None):
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor",
             "ld", "▁world"]
    tokens = pieces + words
    scores = [0.0] * len(pieces) + [-float(i) for i in range(len(words))]
    # longer tokens get better scores than their parts where they must merge first
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    md = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    if add_bos is not None:
        md["tokenizer.ggml.add_bos_token"] = add_bos
    return md


def test_sentencepiece_synthetic():
    md = _spm_meta()
    tok, sp = load_tokenizer(md)
    assert sp.add_bos and sp.bos_id == 1  # llama vocabularies add BOS by default
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    ids = tok.encode("hello world").ids
    assert ids == [1, vocab["▁hello"], vocab["▁world"]]
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    # unknown characters fall back to bytes
    ids = tok.encode("hé").ids
    assert ids[:2] == [1, vocab["▁h"]] and ids[2:] == [3 + 0xC3, 3 + 0xA9]
    assert tok.decode(ids, skip_special_tokens=True) == "hé"
    assert build_tokenizer(_spm_meta(add_bos=False)).encode("hello").ids == [vocab["▁hello"]]


def test_gemma_style_synthetic():
    md = _spm_meta(arch="gemma3")
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["  "]  # multi-space token stored as spaces
    md["tokenizer.ggml.scores"] = md["tokenizer.ggml.scores"] + [0.0]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [1]
    tok = build_tokenizer(md)
    n = len(md["tokenizer.ggml.tokens"])
    vocab = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    ids = tok.encode("hello  ").ids
    # no prefix space; the stored "  " token is reachable as "\u2581\u2581"
    assert ids == [1, vocab["he"], vocab["llo"], n - 1]
    assert tok.decode(ids, skip_special_tokens=True) == "hello  "
    assert tok.decode(tok.encode("hello  world").ids, skip_special_tokens=True) == "hello  world"


def test_numpy_metadata():
    np = pytest.importorskip("numpy")
    md = _spm_meta()
    ref = build_tokenizer(md).encode("hello world").ids
    md["tokenizer.ggml.scores"] = np.asarray(md["tokenizer.ggml.scores"], dtype=np.float32)
    md["tokenizer.ggml.token_type"] = np.asarray(md["tokenizer.ggml.token_type"], dtype=np.int32)
    md["tokenizer.ggml.bos_token_id"] = np.uint32(1)
    md["tokenizer.ggml.add_bos_token"] = np.bool_(True)
    tok, sp = load_tokenizer(md)
    assert tok.encode("hello world").ids == ref and sp.add_bos is True and sp.bos_id == 1


def test_unsupported_model():
    with pytest.raises(ValueError, match="unsupported"):
        build_tokenizer({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


# ---------------------------------------------------------------- real models vs committed fixtures


@pytest.mark.realmodel
@pytest.mark.parametrize("name", MODELS)
def test_real_special_tokens(name):
    _need(name)
    sp = special_tokens(_metadata(name))
    expected = {
        "smollm2": (1, 2, False, False),
        "gemma3-270m": (2, 1, True, False),
        "qwen2.5-coder-0.5b": (151643, 151645, False, False),
    }[name]
    assert (sp.bos_id, sp.eos_id, sp.add_bos, sp.add_eos) == expected


@pytest.mark.realmodel
@pytest.mark.parametrize("name", MODELS)
def test_real_against_fixture(name):
    path = FIXTURES / f"{name}.json"
    if not path.exists():
        pytest.skip(f"no fixture {path}")
    _need(name)
    data = json.loads(path.read_text(encoding="utf-8"))
    tok = _tokenizer(name)
    bad = []
    for prompt, ids in data["ids"].items():
        got = tok.encode(prompt).ids
        if got != ids:
            bad.append((prompt, got, ids))
        elif tok.decode(got, skip_special_tokens=False) != data["decoded"][prompt]:
            bad.append((prompt, "decode", tok.decode(got, skip_special_tokens=False), data["decoded"][prompt]))
    assert not bad, bad[:3]
    assert len(data["ids"]) >= 30


# ---------------------------------------------------------------- live comparison with transformers


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = packaged.resolve(name)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.oracle
@pytest.mark.realmodel
@pytest.mark.parametrize("name", MODELS)
def test_real_against_transformers(name):
    pytest.importorskip("transformers")
    _need(name)
    from make_tokenizer_fixtures import PROMPTS

    hf = _hf_tokenizer(name)
    tok = _tokenizer(name)
    for prompt in PROMPTS + EXTRA_PROMPTS:
        ids = hf(prompt)["input_ids"]
        assert tok.encode(prompt).ids == ids, prompt
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), prompt
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), prompt
    sp = special_tokens(_metadata(name))
    assert (sp.bos_id, sp.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert tok.get_vocab_size(with_added_tokens=True) == len(hf)
