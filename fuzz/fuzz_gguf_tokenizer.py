"""Fuzz target: tokenizer metadata (tokenizer.ggml.*) read from a GGUF file and turned into a `tokenizers`
tokenizer (factrace.io.gguf_tokenizer.load_tokenizer), then an encode/decode round trip."""
import _common
import atheris

with atheris.instrument_imports(include=["factrace"]):
    from factrace.io.gguf import GGUFFile
    from factrace.io.gguf_tokenizer import load_tokenizer

ERRORS = _common.expected_errors()
PATH = _common.SCRATCH / "tok.gguf"


def TestOneInput(data: bytes) -> None:
    _common.overwrite(PATH, data)
    try:
        with GGUFFile(PATH) as f:
            md = f.metadata
    except ERRORS:
        return
    if "tokenizer.ggml.model" not in md:
        return
    try:
        # load_gguf turns exactly these into GGUFError("cannot build the tokenizer ...")
        tk, sp = load_tokenizer(md)
    except (ValueError, KeyError, TypeError):
        return
    enc = tk.encode("The Eiffel Tower is in Paris. ü ✓ 123")
    tk.decode(enc.ids, skip_special_tokens=False)


if __name__ == "__main__":
    _common.run(TestOneInput)
