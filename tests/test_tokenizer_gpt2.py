"""factrace's tokenizer on the real GPT-2 tokenizer (../shared/data/gpt2-tokenizer) encodes and decodes every
known_1000 prompt, subject and "prompt attribute" exactly as transformers does.

* test_matches_fixture: against tests/fixtures/gpt2_known1000_ids.json (tests/make_gpt2_token_fixture.py),
  no transformers needed;
* test_matches_transformers_live: against GPT2TokenizerFast and AutoTokenizer (marker ``oracle``).
"""
import hashlib
import json

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA

TOK_DIR = SHARED_DATA / "gpt2-tokenizer"
KNOWN = SHARED_DATA / "known_1000.json"
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2_known1000_ids.json"

pytestmark = pytest.mark.skipif(not (TOK_DIR / "tokenizer.json").exists() or not KNOWN.exists(),
                                reason=f"shared GPT-2 tokenizer / known_1000 not found under {SHARED_DATA}")


def _strings(rec):
    return [rec["prompt"], rec["subject"], rec["prompt"] + " " + rec["attribute"]]


@pytest.fixture(scope="module")
def tok():
    from factrace.io.tokenizer import Tokenizer

    return Tokenizer.from_file(TOK_DIR / "tokenizer.json")


@pytest.fixture(scope="module")
def known():
    recs = json.loads(KNOWN.read_text(encoding="utf-8"))
    assert len(recs) == 1209
    return recs


@pytest.fixture(scope="module")
def fixture_data():
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def test_fixture_is_for_this_tokenizer(fixture_data):
    sha = hashlib.sha256((TOK_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert fixture_data["tokenizer_json_sha256"] == sha, "regenerate with tests/make_gpt2_token_fixture.py"


def test_matches_fixture(tok, known, fixture_data):
    rows = {r[0]: r[1:] for r in fixture_data["rows"]}
    assert len(rows) == len(known)
    n = 0
    for rec in known:
        want = rows[rec["known_id"]]
        for s, ids in zip(_strings(rec), want):
            got = tok.encode(s)
            assert got.dtype == np.int32
            assert got.tolist() == ids, f"known_id {rec['known_id']}: encode({s!r})"
            assert tok.decode(ids) == s, f"known_id {rec['known_id']}: decode of {s!r}"
            n += 1
    assert n == 3 * 1209


def test_extra_strings_match_fixture(tok, fixture_data):
    for s, ids, decoded in fixture_data["extra"]:
        assert tok.encode(s).tolist() == ids, repr(s)
        assert tok.decode(ids) == decoded, repr(s)


def test_round_trip(tok, known):
    for rec in known:
        for s in _strings(rec) + [rec["prediction"], rec["attribute"], " " + rec["subject"]]:
            assert tok.decode(tok.encode(s)) == s, repr(s)


def test_gpt2_adds_no_special_tokens(tok, known):
    for rec in known[:50]:
        s = rec["prompt"]
        assert tok.encode(s).tolist() == tok.encode(s, add_special_tokens=False).tolist()
    assert tok.encode("<|endoftext|>").tolist() == [50256]
    assert tok.vocab_size == 50257


def test_offsets_cover_subject(tok, known):
    """Character offsets of the prompt's tokens line up with the subject at the start of the prompt."""
    for rec in known[:200]:
        p, s = rec["prompt"], rec["subject"]
        ids, offs = tok.encode_with_offsets(p)
        assert len(offs) == len(ids)
        assert "".join(p[a:b] for a, b in offs) == p
        if p.startswith(s):
            k = len(tok.encode(s))
            # the subject tokenized alone is a prefix of the prompt's tokens when it ends at a word boundary
            if len(p) == len(s) or not p[len(s)].isalnum():
                assert ids[:k].tolist() == tok.encode(s).tolist(), repr(s)


def test_token_strings(tok):
    ids = tok.encode("The Eiffel Tower is in")
    strs = tok.token_strings(ids)
    assert "".join(strs) == "The Eiffel Tower is in"
    assert len(strs) == len(ids)


@pytest.mark.oracle
def test_matches_transformers_live(tok, known):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, GPT2TokenizerFast

    fast = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    auto = AutoTokenizer.from_pretrained(str(TOK_DIR))
    for rec in known:
        for s in _strings(rec) + [rec["prediction"]]:
            got = tok.encode(s).tolist()
            assert got == fast(s)["input_ids"], repr(s)
            assert got == auto.encode(s), repr(s)
            assert tok.decode(got) == fast.decode(got), repr(s)
            assert tok.decode(got) == auto.decode(got), repr(s)
            assert tok.token_strings(got) == [fast.decode([i]) for i in got], repr(s)
