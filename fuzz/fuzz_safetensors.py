"""Fuzz target: one .safetensors file (header length, JSON header, dtypes, shapes, data ranges) and the
float32 conversion of every tensor it accepts."""
import _common  # noqa: F401  (sets sys.path)
import atheris

with atheris.instrument_imports(include=["factrace"]):
    from factrace.io.safetensors import FLOAT_DTYPES, SafetensorsFile

ERRORS = _common.expected_errors()
PATH = _common.SCRATCH / "model.safetensors"


def TestOneInput(data: bytes) -> None:
    _common.overwrite(PATH, data)
    try:
        f = SafetensorsFile(PATH)
    except ERRORS:
        return
    try:
        for name, (dt, shape, (b, e)) in f.tensors.items():
            raw = f.raw(name)
            assert raw.nbytes == e - b and tuple(raw.shape) == tuple(shape), name
            if dt in FLOAT_DTYPES:
                t = f.tensor(name)
                assert t.shape == tuple(shape) and t.dtype == "float32" and t.flags.c_contiguous
            del raw
    finally:
        f.close()


if __name__ == "__main__":
    _common.run(TestOneInput)
