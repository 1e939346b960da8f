"""Write tests/fixtures/gpt2_known1000_ids.json: the GPT-2 token ids that transformers assigns to every
known_1000 prompt, subject and "prompt attribute" string (plus a few hand-picked hard strings).

Needs transformers and the shared data (../shared/data/known_1000.json, ../shared/data/gpt2-tokenizer).
Run from the project root:  python tests/make_gpt2_token_fixture.py
tests/test_tokenizer_gpt2.py checks factrace's tokenizer against this file without transformers.
"""
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, SHARED_DATA  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "gpt2_known1000_ids.json"
TOK_DIR = SHARED_DATA / "gpt2-tokenizer"
KNOWN = SHARED_DATA / "known_1000.json"

# Strings that exercise the byte-level pre-tokenizer: contractions, digits, runs of spaces, newlines,
# non-ASCII (multi-byte UTF-8, emoji), the special token inside text.
EXTRA = [
    "",
    " ",
    "  leading and trailing  ",
    "It's what they'd've done, isn't it? I'M SURE",
    "1234567 + 89 = 1234656; 3.14159",
    "line one\nline two\n\n\ttabbed\r\n",
    "Zürich, São Paulo, Kraków, Reykjavík and 東京 🗼",
    "before<|endoftext|>after <|endoftext|>",
    "a" * 300,
]


def records():
    return json.loads(KNOWN.read_text(encoding="utf-8"))


def strings_of(rec):
    """The three strings tested per record, in the order of the fixture's ``fields``."""
    return [rec["prompt"], rec["subject"], rec["prompt"] + " " + rec["attribute"]]


def main():
    import transformers
    from transformers import AutoTokenizer, GPT2TokenizerFast

    auto = AutoTokenizer.from_pretrained(str(TOK_DIR))
    fast = GPT2TokenizerFast.from_pretrained(str(TOK_DIR))
    rows = []
    for rec in records():
        ids = []
        for s in strings_of(rec):
            a = auto.encode(s)
            b = fast(s)["input_ids"]
            if a != b:
                raise SystemExit(f"AutoTokenizer and GPT2TokenizerFast disagree on {s!r}")
            if fast.decode(a) != s:
                raise SystemExit(f"transformers does not round-trip {s!r}")
            ids.append(a)
        rows.append([rec["known_id"]] + ids)
    extra = []
    for s in EXTRA:
        a = fast(s)["input_ids"]
        if a != auto.encode(s):
            raise SystemExit(f"AutoTokenizer and GPT2TokenizerFast disagree on {s!r}")
        extra.append([s, a, fast.decode(a)])
    sha = hashlib.sha256((TOK_DIR / "tokenizer.json").read_bytes()).hexdigest()
    head = {"transformers_version": transformers.__version__, "tokenizer_json_sha256": sha,
            "fields": ["prompt", "subject", "prompt + ' ' + attribute"],
            "note": "rows: [known_id, ids...] in the order of fields; transformers decodes each back to the string"}
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("{\n")
        for k, v in head.items():
            f.write(f"{json.dumps(k)}: {json.dumps(v)},\n")
        f.write('"extra": [\n' + ",\n".join(json.dumps(e, ensure_ascii=False) for e in extra) + "\n],\n")
        f.write('"rows": [\n' + ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows) + "\n]\n}\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(rows)} records)")


if __name__ == "__main__":
    main()
