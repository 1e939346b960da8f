"""Fuzz target: a whole GGUF file through factrace's Python layer over the C reader: header, metadata of
every type, tensor infos, dequantisation of every tensor, the config built from metadata, the weights
and the tokenizer (factrace.io.load.load_gguf)."""
import _common
import atheris

with atheris.instrument_imports(include=["factrace"]):
    from factrace.io.gguf import GGUFFile
    from factrace.io.load import load_gguf

ERRORS = _common.expected_errors()
PATH = _common.SCRATCH / "model.gguf"
DEQUANT = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


def TestOneInput(data: bytes) -> None:
    _common.overwrite(PATH, data)
    try:
        f = GGUFFile(PATH)
    except ERRORS:
        return
    with f:
        md = f.metadata
        for k, v in md.items():
            assert isinstance(k, str)
        for name, info in f.tensors.items():
            r = f.raw(name)
            assert r.nbytes == info.nbytes, name
            if info.type_name in DEQUANT and info.n_elements <= (1 << 22):
                t = f.tensor(name)
                assert t.size == info.n_elements, name
    try:
        m = load_gguf(PATH)
    except ERRORS:
        return
    # a valid model may have a tiny vocabulary or context: stay inside both (run() refuses the rest)
    V, n_ctx = m.config.vocab_size, m.config.n_ctx
    ids = m.encode("The Eiffel Tower is in") if m.tokenizer is not None else [1 % V, 2 % V]
    ids = list(ids)[:n_ctx]
    if len(ids):
        m.run(ids)


if __name__ == "__main__":
    _common.run(TestOneInput)
