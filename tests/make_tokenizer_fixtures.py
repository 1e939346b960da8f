"""Regenerate the transformers-derived fixtures for the packaged real models (needs transformers).

    python tests/make_tokenizer_fixtures.py            # tests/fixtures/tokenizer/<model>.json
    python tests/make_tokenizer_fixtures.py --logits   # also tests/fixtures/real/<model>_logits.npz (needs torch)
    python tests/make_tokenizer_fixtures.py --facts    # print greedy next token + prob for FACT_PROMPTS

Tokenizer fixtures map prompt -> ``tokenizer(prompt)["input_ids"]`` from
``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` (BOS included where transformers adds it).
Logit fixtures hold, for ``LOGIT_PROMPTS``, the input ids (``ids_<i>``, int32) and the float32 logits
of the LAST position (``logits``, shape (3, vocab)) of ``AutoModelForCausalLM.from_pretrained(dir,
gguf_file=name)`` (weights dequantized to float32, eager attention, CPU), plus ``prompts``.
Models whose package is not installed are skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from factrace.io import packaged# noqa: E402

MODELS = ["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"]

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Fact: The Colosseum is in the country of",
    "The capital of Japan is",
    "Barack Obama was born in the state of",
    "The Great Wall is located in the country of",
    "Water is made of hydrogen and",
    "The largest planet in the solar system is",
    "Romeo and Juliet was written by William",
    "In 1969, Neil Armstrong walked on the",
    "The price is $1,234.56 (about 1234567 cents).",
    "Numbers: 0 1 22 333 4444 55555 123456789",
    "3.14159265358979 is pi; e ≈ 2.71828",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    internal     spaces",
    "tabs\tand\ttabs\t\tdouble",
    "line one\nline two\n\nline four\n\n\n",
    "\n\nstarts with newlines",
    "Crème brûlée, naïve café, façade, Zürich, São Paulo",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "北京是中国的首都。",
    "مرحبا بالعالم",
    "Emoji: 😀🎉👍🏽 and 🇫🇷 flags",
    "def f(x):\n    return x ** 2  # square",
    "I'm sure they'll say it's fine, we've done it.",
    "ALL CAPS SHOUTING and MiXeD CaSe",
    "URL: https://example.com/path?a=1&b=2",
    "<b>html</b> &amp; <|endoftext|> text",
    "",
    " ",
    "a",
]

FACT_PROMPTS = [
    ("The Eiffel Tower is located in the city of", "Paris"),
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("Fact: The Colosseum is in the country of", "Italy"),
    ("The Great Wall is located in the country of", "China"),
    ("Barack Obama was born in the state of", "Hawaii"),
    ("The largest planet in the solar system is", "Jupiter"),
    ("Romeo and Juliet was written by William", "Shakespeare"),
    ("Water is made of hydrogen and", "oxygen"),
    ("The chemical symbol for gold is", "Au"),
    ("Microsoft was founded by Bill", "Gates"),
    ("The language spoken in Brazil is", "Portuguese"),
    ("Mount Everest is located in the country of", "Nepal"),
    ("The currency of Japan is the", "yen"),
]

LOGIT_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Fact: The Colosseum is in the country of",
    "The capital of Japan is",
]


def _load_tok(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def make_tokenizer_fixture(name: str, path: Path) -> Path:
    tok = _load_tok(path)
    data = {
        "model": name,
        "gguf_file": path.name,
        "source": "transformers AutoTokenizer.from_pretrained(dir, gguf_file=...) tokenizer(prompt)['input_ids']",
        "ids": {p: tok(p)["input_ids"] for p in PROMPTS},
        "decoded": {p: tok.decode(tok(p)["input_ids"]) for p in PROMPTS},
    }
    out = HERE / "fixtures" / "tokenizer" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return out


def _load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _last_logits(model, tok, prompt):
    import torch

    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    return ids[0].numpy(), logits.numpy()


def make_logits_fixture(name: str, path: Path, model=None, tok=None) -> Path:
    import numpy as np

    tok = tok or _load_tok(path)
    model = model or _load_model(path)
    arrays = {"prompts": np.array(LOGIT_PROMPTS)}
    rows = []
    for i, p in enumerate(LOGIT_PROMPTS):
        ids, lg = _last_logits(model, tok, p)
        arrays[f"ids_{i}"] = ids.astype(np.int32)
        rows.append(lg.astype(np.float32))
    arrays["logits"] = np.stack(rows)
    out = HERE / "fixtures" / "real" / f"{name}_logits.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


def facts(name: str, path: Path, model=None, tok=None) -> list[tuple]:
    import torch

    tok = tok or _load_tok(path)
    model = model or _load_model(path)
    rows = []
    for prompt, want in FACT_PROMPTS:
        _, lg = _last_logits(model, tok, prompt)
        p = torch.softmax(torch.from_numpy(lg), -1)
        top = int(p.argmax())
        tid = tok.decode([top])
        rows.append((prompt, want, top, tid, float(p[top]), want.lower() in tid.lower() and tid.strip() != "",
                     float(abs(lg).max())))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logits", action="store_true", help="also write tests/fixtures/real/<model>_logits.npz")
    ap.add_argument("--facts", action="store_true", help="print greedy next-token facts")
    ap.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer fixtures")
    ap.add_argument("models", nargs="*", default=MODELS)
    args = ap.parse_args(argv)
    for name in args.models:
        if not packaged.is_installed(name):
            print(f"skip {name}: not installed ({packaged.KNOWN[name].pip})")
            continue
        path = packaged.resolve(name)
        if not args.no_tokenizer:
            print("wrote", make_tokenizer_fixture(name, path))
        if args.logits or args.facts:
            tok, model = _load_tok(path), _load_model(path)
            if args.logits:
                print("wrote", make_logits_fixture(name, path, model, tok))
            if args.facts:
                print(f"## {name}")
                for prompt, want, top, tid, prob, ok, mx in facts(name, path, model, tok):
                    print(f"| {prompt} | {want} | {tid!r} ({top}) | {prob:.3f} | {'yes' if ok else 'no'} | {mx:.2f} |")


if __name__ == "__main__":
    main()
