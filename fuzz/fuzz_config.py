"""Fuzz target: config.json. The first input byte picks a fixture model (its weights and tokenizer), the
rest is the config.json text; load_hf_dir must either load a model that runs or raise a documented error."""
import json
import os

import _common
import atheris

with atheris.instrument_imports(include=["factrace"]):
    from factrace.io.config import from_hf_config
    from factrace.io.load import load_hf_dir

ERRORS = _common.expected_errors()
NAMES = sorted(p.name for p in _common.FIXTURES.iterdir() if (p / "model.safetensors").exists())
DIRS = []
for name in NAMES:
    d = _common.SCRATCH / name
    d.mkdir(exist_ok=True)
    for p in (_common.FIXTURES / name).iterdir():
        if p.name not in ("config.json", "expected.npz") and not (d / p.name).exists():
            os.symlink(p, d / p.name)
    DIRS.append(d)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    d = DIRS[data[0] % len(DIRS)]
    text = data[1:]
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raw = None
    if isinstance(raw, dict):
        try:
            from_hf_config(raw)
        except ERRORS:
            pass
    _common.overwrite(d / "config.json", text)
    try:
        m = load_hf_dir(d)
    except ERRORS:
        return
    ids = [1, 2, 3][:m.config.n_ctx]  # a valid config may allow fewer positions (then run() refuses more)
    r = m.run(ids, capture=True)
    assert r.logits.shape == (len(ids), m.config.vocab_size)


if __name__ == "__main__":
    _common.run(TestOneInput)
