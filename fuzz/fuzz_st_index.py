"""Fuzz target: model.safetensors.index.json of a sharded checkpoint (the shards are the valid ones of
tests/fixtures/models/llama_sharded; the index is the fuzzed input), then a full load_hf_dir."""
import os
import shutil

import _common
import atheris

with atheris.instrument_imports(include=["factrace"]):
    from factrace.io.load import load_hf_dir
    from factrace.io.safetensors import Checkpoint

ERRORS = _common.expected_errors()
SRC = _common.FIXTURES / "llama_sharded"
DIR = _common.SCRATCH / "sharded"
DIR.mkdir(exist_ok=True)
for p in SRC.iterdir():
    if p.name != "model.safetensors.index.json":
        shutil.copy(p, DIR / p.name)
INDEX = DIR / "model.safetensors.index.json"


def TestOneInput(data: bytes) -> None:
    _common.overwrite(INDEX, data)
    try:
        with Checkpoint(DIR) as ck:
            for name in ck.names:
                ck.shape(name)
                assert ck.path_of(name).parent == DIR, name   # never outside the model directory
    except ERRORS:
        return
    try:
        m = load_hf_dir(DIR)
    except ERRORS:
        return
    m.run([1, 2, 3])


if __name__ == "__main__":
    assert os.path.isdir(SRC), SRC
    _common.run(TestOneInput)
