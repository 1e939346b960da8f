"""Build a Hugging Face ``tokenizers.Tokenizer`` from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary, merges, scores, token types and
special-token ids as metadata under llama.cpp's key names.  This module rebuilds the same fast
tokenizer that ``transformers.AutoTokenizer.from_pretrained(dir, gguf_file=name)`` builds (checked id
for id against transformers 5.x in ``tests/test_gguf_tokenizer.py``), without importing transformers:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE with the file's merges.  Tokens spelled outside
  the byte alphabet are respelled byte-wise.  ``tokenizer.ggml.pre`` picks the split regex
  (``PRE_TOKENIZER_SPLITS``); a pre type not in the table (``"gpt-2"``, ``"smollm"``, ``"default"``,
  ...) gets the GPT-2 ``ByteLevel`` regex, as transformers does.  (llama.cpp additionally splits
  digits one by one for ``"smollm"``; for SmolLM2's vocabulary, which has no multi-digit tokens, the
  ids only differ for whitespace runs directly in front of a digit, and we follow transformers.)
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback.  The file has no
  merges, so they are rebuilt from the vocabulary, ordered by score (or, for Gemma files, by
  position in the vocabulary, with multi-space tokens respelled as ``"\u2581"`` runs).
* ``tokenizer.ggml.model == "t5"``: unigram with scores (basic support).

Tokens whose ``token_type`` is CONTROL (3) become special added tokens, USER_DEFINED (4) ones plain
added tokens, so that they are matched whole in the text.  The BOS/EOS post-processor follows
``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` (default: add BOS for ``"llama"`` vocabularies).

Example::

    >>> from factrace.gguf import GGUFFile                      # doctest: +SKIP
    >>> from factrace.gguf_tokenizer import load_tokenizer
    >>> tok, special = load_tokenizer(GGUFFile(path).metadata)  # doctest: +SKIP
    >>> tok.encode("The Eiffel Tower is located in the city of").ids   # doctest: +SKIP
    [2, 818, 94648, 25822, 563, 5628, 528, 506, 3207, 529]   # Gemma 3: BOS (2) first
    >>> special.bos_id, special.add_bos                         # doctest: +SKIP
    (2, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = [
    "SpecialTokens",
    "build_tokenizer",
    "load_tokenizer",
    "special_tokens",
    "PRE_TOKENIZER_SPLITS",
    "TOKEN_TYPE",
]

# llama.cpp's llama_token_type
TOKEN_TYPE = {"undefined": 0, "normal": 1, "unknown": 2, "control": 3, "user_defined": 4, "unused": 5, "byte": 6}
_CONTROL = 3
_USER_DEFINED = 4

_SPIECE = "\u2581"

# Split regexes for byte-level vocabularies (the same table transformers' GGUF converter uses,
# which in turn follows llama.cpp's llama-vocab.cpp for these pre types).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3,
    ),
    "tekken": _TEKKEN,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O),
}

# Architectures whose "llama" (SentencePiece) vocabulary is Gemma-shaped.
_GEMMA_ARCHS = {"gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding"}


@dataclass(frozen=True)
class SpecialTokens:
    """Special-token facts from ``tokenizer.ggml.*`` (ids are ``None`` when the file has none)."""

    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    model: str
    pre: str | None


def _get(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = metadata.get("tokenizer.ggml." + key, default)
    # numeric arrays may come as NumPy arrays (factrace.gguf) or lists (gguf-py); scalars as NumPy scalars
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value


def special_tokens(metadata: Mapping[str, Any]) -> SpecialTokens:
    """The special-token ids and BOS/EOS flags, with transformers' defaults.

    ``add_bos`` defaults to True for ``"llama"`` (SentencePiece) vocabularies and False otherwise;
    it is forced False for ``"gemma4"`` (the chat template writes ``<bos>`` itself), as transformers does.
    """
    model = _get(metadata, "model")
    if model is None:
        raise ValueError("metadata has no tokenizer.ggml.model")
    add_bos = _get(metadata, "add_bos_token")
    if add_bos is None:
        add_bos = model == "llama"
    if model == "gemma4":
        add_bos = False
    add_eos = bool(_get(metadata, "add_eos_token", False))
    ids = {k: _get(metadata, k + "_token_id") for k in ("bos", "eos", "unknown", "padding")}
    ids = {k: (int(v) if v is not None else None) for k, v in ids.items()}
    return SpecialTokens(
        bos_id=ids["bos"], eos_id=ids["eos"], unk_id=ids["unknown"], pad_id=ids["padding"],
        add_bos=bool(add_bos) and ids["bos"] is not None,
        add_eos=add_eos and ids["eos"] is not None,
        model=str(model), pre=_get(metadata, "pre"),
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(
        range(ord("\xae"), ord("\xff") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _merges_from_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Rebuild BPE merges from a vocabulary: every split ``l + r`` of a token where both halves are
    tokens, best-ranked token first; splits of one token ordered by (id of l, id of r); ties between
    equally ranked splits broken by longer left part, then longer right part, then that order.
    (Equivalent to transformers' ``generate_merges(vocab, rank)``.) The candidates are kept as integer
    arrays and sorted with NumPy, so a 262k-token vocabulary (Gemma) needs tens of MB, not hundreds."""
    import array

    import numpy as np

    by_id = {i: t for t, i in vocab.items()}
    li, ri, sc, ll, rl = (array.array("q") for _ in range(5))
    scores = array.array("d")
    for token, score in rank.items():
        n = len(token)
        if n < 2:
            continue
        local = []
        for i in range(1, n):
            a = vocab.get(token[:i])
            if a is None:
                continue
            b = vocab.get(token[i:])
            if b is not None:
                local.append((a, b, i))
        local.sort()
        for a, b, i in local:
            li.append(a)
            ri.append(b)
            ll.append(i)
            rl.append(n - i)
            scores.append(float(score))
    if not li:
        return []
    s, lft, rgt = np.frombuffer(scores, np.float64), np.frombuffer(ll, np.int64), np.frombuffer(rl, np.int64)
    order = np.lexsort((np.arange(len(s)), -rgt, -lft, -s))  # last key first: score, len(l), len(r) descending
    L, R = np.frombuffer(li, np.int64)[order], np.frombuffer(ri, np.int64)[order]
    return [(by_id[int(x)], by_id[int(y)]) for x, y in zip(L, R)]


def _file_merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    merges = _get(metadata, "merges")
    if merges is None:
        return None
    out = []
    for m in merges:
        left, _, right = m.partition(" ")
        out.append((left, right))
    return out


def _byte_level(metadata: Mapping[str, Any]) -> tuple[Tokenizer, list[str]]:
    tokens: Sequence[str] = _get(metadata, "tokens")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    merges = _file_merges(metadata)
    if merges is None:
        scores = _get(metadata, "scores")
        merges = _merges_from_vocab(vocab, dict(zip(tokens, map(float, scores))) if scores is not None else vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(_get(metadata, "pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tk.decoder = decoders.ByteLevel()
    return tk, list(tokens)


def _token_index(i, tokens, key: str) -> int:
    """``i`` if it is an integer index into ``tokens``, else ValueError naming ``key``."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(tokens):
        raise ValueError(f"{key} {i!r} is outside the vocabulary of {len(tokens)} tokens")
    return i


def _sentencepiece(metadata: Mapping[str, Any], arch: str) -> tuple[Tokenizer, list[str]]:
    tokens = list(_get(metadata, "tokens"))
    gemma = (isinstance(arch, str) and arch in _GEMMA_ARCHS) or _get(metadata, "model") == "gemma4"
    unk_id = _get(metadata, "unknown_token_id")
    if gemma:
        # multi-space tokens are stored as real spaces; the normalizer turns spaces into U+2581
        tokens = [_SPIECE * len(t) if (" " in t and not t.strip()) else t for t in tokens]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(metadata)
    if merges is None:
        if gemma:
            rank = {t: -i for i, t in enumerate(tokens)}  # Gemma: file order is merge order
        else:
            scores = _get(metadata, "scores")
            if scores is None:
                raise ValueError("SentencePiece GGUF vocabulary has neither merges nor scores")
            rank = dict(zip(tokens, (float(s) for s in scores)))
        merges = _merges_from_vocab(vocab, rank)
    if gemma:
        if unk_id is not None:
            unk = tokens[_token_index(unk_id, tokens, "unknown_token_id")]
        else:  # no unk id: '<unk>' if the vocabulary has it, else none (a missing unk token makes
            unk = "<unk>" if "<unk>" in vocab else None  # `tokenizers` fail at encode time)
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token=unk, dropout=None,
                                  byte_fallback=True))
        tk.normalizer = normalizers.Replace(" ", _SPIECE)
        tk.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tk.decoder = decoders.Sequence([decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse()])
    elif arch == "phi3":
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend(_SPIECE), normalizers.Replace(" ", _SPIECE)])
        tk.decoder = decoders.Sequence([decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(content=" ", left=1)])
    else:
        # transformers' LlamaTokenizer (legacy=False): prefix space on the first piece only.
        # NB: transformers ignores tokenizer.ggml.add_space_prefix here; so do we, to stay id-exact.
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE, prepend_scheme="first", split=False)
        tk.decoder = decoders.Sequence([decoders.Replace(_SPIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(content=" ", left=1)])
    return tk, tokens


def _unigram(metadata: Mapping[str, Any]) -> tuple[Tokenizer, list[str]]:
    tokens = list(_get(metadata, "tokens"))
    scores = [float(s) for s in _get(metadata, "scores")]
    unk_id = _token_index(_get(metadata, "unknown_token_id", 2), tokens, "unknown_token_id")
    tk = Tokenizer(models.Unigram(list(zip(tokens, scores)), unk_id=unk_id, byte_fallback=False))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPIECE, prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement=_SPIECE, prepend_scheme="always")
    return tk, tokens


def build_tokenizer(metadata: Mapping[str, Any]) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to transformers' tokenizer for this GGUF metadata.

    ``metadata`` maps GGUF keys to values (strings as ``str``, arrays as lists), e.g.
    ``GGUFFile(path).metadata``.  ``tok.encode(text).ids`` includes BOS/EOS exactly when
    transformers' ``tokenizer(text)["input_ids"]`` does; ``tok.decode(ids, skip_special_tokens=False)``
    equals transformers' ``tokenizer.decode(ids)``.
    """
    model = _get(metadata, "model")
    arch = str(metadata.get("general.architecture", ""))
    if model == "gpt2":
        tk, original = _byte_level(metadata)
        byte_alphabet = set(_bytes_to_unicode().values())
    elif model in ("llama", "gemma4"):
        tk, original = _sentencepiece(metadata, arch)
        original = list(_get(metadata, "tokens"))
        byte_alphabet = None
    elif model == "t5":
        tk, original = _unigram(metadata)
        byte_alphabet = None
    else:
        raise ValueError(f"unsupported tokenizer.ggml.model {model!r} (supported: gpt2, llama, gemma4, t5)")

    types = _get(metadata, "token_type")
    types = [] if types is None else [int(t) for t in types]
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(original, types)
        if ty == _CONTROL and (byte_alphabet is None or set(t) <= byte_alphabet)
    ]
    if control:
        tk.add_special_tokens(control)
    vocab = tk.get_vocab(with_added_tokens=True)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(original, types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tk.add_tokens(user)

    sp = special_tokens(metadata)
    id_to_tok = tk.id_to_token
    single, pair, specials = "$A:0", "$B:1", []
    if sp.add_bos:
        bos = id_to_tok(sp.bos_id)
        single = f"{bos}:0 {single}"
        pair = f"{bos}:1 {pair}"
        specials.append((bos, sp.bos_id))
    if sp.add_eos:
        eos = id_to_tok(sp.eos_id)
        single = f"{single} {eos}:0"
        pair = f"{pair} {eos}:1"
        if not sp.add_bos or eos != id_to_tok(sp.bos_id):
            specials.append((eos, sp.eos_id))
    tk.post_processor = processors.TemplateProcessing(single=single, pair=f"{single} {pair}",
                                                      special_tokens=specials)
    return tk


def load_tokenizer(metadata: Mapping[str, Any]) -> tuple[Tokenizer, SpecialTokens]:
    """``(build_tokenizer(metadata), special_tokens(metadata))``.

    ``metadata`` values may be lists or NumPy arrays (numeric arrays) and Python or NumPy scalars."""
    try:
        return build_tokenizer(metadata), special_tokens(metadata)
    except (ValueError, KeyError, TypeError):
        raise
    except Exception as e:  # the tokenizers library raises plain Exception for inconsistent vocabularies
        raise ValueError(f"tokenizers rejected the vocabulary ({e})") from None
