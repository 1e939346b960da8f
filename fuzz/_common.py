"""Shared helpers of the atheris fuzz targets (fuzz/fuzz_*.py).

Each target is a plain script: ``python fuzz/fuzz_X.py [libFuzzer flags] CORPUS_DIR``. Inputs are
written to a scratch file (in /dev/shm when there is one) and opened through factrace's public
parsers exactly as a downloaded checkpoint would be. The only exceptions a parser may raise on bad
bytes are the ValueError subclasses factrace documents (CheckpointError, GGUFError, ConfigError,
TokenizerError, InputError); anything else (TypeError, KeyError, IndexError, OverflowError,
MemoryError, RecursionError ...) is a finding and atheris stops with a crash file.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests"), str(ROOT / "fuzz")):
    if p not in sys.path:
        sys.path.insert(0, p)

FIXTURES = ROOT / "tests" / "fixtures" / "models"
_base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
SCRATCH = Path(tempfile.mkdtemp(prefix="factrace-fuzz-", dir=_base))



def overwrite(path, data: bytes) -> Path:
    """Replace the file's contents in place (no new inode: cheap on tmpfs)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)
    return Path(path)


def expected_errors():
    """The exception classes a parser may legitimately raise on malformed input."""
    from factrace.errors import ConfigError
    from factrace.errors import GGUFError
    from factrace.errors import InputError
    from factrace.errors import CheckpointError
    from factrace.errors import TokenizerError

    return (CheckpointError, GGUFError, ConfigError, TokenizerError, InputError)


def run(test_one_input):
    """Instrument factrace's Python code and start libFuzzer (atheris)."""
    import atheris

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
