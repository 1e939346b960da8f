"""A thin wrapper around a Hugging Face ``tokenizers.Tokenizer`` with the calls factrace needs:
ids as int32 arrays, character offsets for subject spans, and per-token strings for labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import TokenizerError




class Tokenizer:
    """Encode and decode text exactly like the model's Hugging Face fast tokenizer.

    Example:
        >>> tok = Tokenizer.from_file("tokenizer.json")          # doctest: +SKIP
        >>> tok.encode("The Eiffel Tower is in")                 # doctest: +SKIP
        array([  464, 412, 733, 417, 8765, 318, 287], dtype=int32)
    """

    def __init__(self, tk, bos_id=None, eos_id=None, source="<memory>"):
        self.tk = tk
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.source = str(source)

    @classmethod
    def from_file(cls, path, directory=None) -> "Tokenizer":
        from tokenizers import Tokenizer as TK

        path = Path(path)
        try:
            tk = TK.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{path}: cannot load tokenizer ({e})") from None
        bos = eos = None
        cfg = Path(directory or path.parent) / "tokenizer_config.json"
        if cfg.exists():
            try:
                tc = json.loads(cfg.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{cfg}: unreadable ({e})") from None
            if not isinstance(tc, dict):
                raise TokenizerError(f"{cfg}: expected a JSON object, got {type(tc).__name__}")
            for key in ("bos_token", "eos_token"):
                v = tc.get(key)
                if isinstance(v, dict):
                    v = v.get("content")
                if isinstance(v, str):
                    tid = tk.token_to_id(v)
                    if key == "bos_token":
                        bos = tid
                    else:
                        eos = tid
        return cls(tk, bos, eos, path)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> np.ndarray:
        """Token ids (T,) int32 of ``text``; ``add_special_tokens`` as in transformers (BOS for Llama)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return np.asarray(self.tk.encode(text, add_special_tokens=add_special_tokens).ids, dtype=np.int32)

    def encode_with_offsets(self, text: str, add_special_tokens: bool = True):
        """(ids (T,) int32, offsets list of (start, end) character spans; special tokens get (0, 0))."""
        enc = self.tk.encode(text, add_special_tokens=add_special_tokens)
        offs = [tuple(o) for o in enc.offsets]
        special = list(enc.special_tokens_mask)
        offs = [(0, 0) if s else o for o, s in zip(offs, special)]
        return np.asarray(enc.ids, dtype=np.int32), offs

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (any int sequence)."""
        return self.tk.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids) -> list:
        """One decoded string per token (for plot labels and tables)."""
        return [self.tk.decode([int(i)], skip_special_tokens=False) for i in np.asarray(ids).reshape(-1)]
