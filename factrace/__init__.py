"""factrace: find where and how decoder-only transformers recall facts.

    >>> import factrace
    >>> m = factrace.load("smollm2")                       # a model an installed package ships
    >>> r = m.run(m.encode("The Eiffel Tower is located in the city of"), capture=True)
    >>> r.attn_out.shape, r.head_out.shape                 # (L, T, d), (L, H, T, d)

See README.md and docs/ARCHITECTURE.md.
"""
from ._blas import preload as _preload

_preload()

from . import _core  # noqa: E402
from .config import ConfigError, ModelConfig, SUPPORTED_ARCHS  # noqa: E402
from .interventions import Intervention, add, block_attention, freeze, set_values, zero  # noqa: E402
from .loader import load  # noqa: E402
from .model import InputError, Model, RunResult, set_num_threads  # noqa: E402
from .safetensors import CheckpointError  # noqa: E402
from .tracing import gini, knockout, sever, subject_span, trace, trace_all, trace_dataset  # noqa: E402

BLAS = _core.BLAS
__version__ = "0.1.0"

__all__ = ["load", "Model", "RunResult", "ModelConfig", "ConfigError", "CheckpointError", "InputError",
           "SUPPORTED_ARCHS", "Intervention", "add", "set_values", "freeze", "zero", "block_attention",
           "set_num_threads", "BLAS", "trace", "trace_all", "trace_dataset", "sever", "knockout", "gini",
           "subject_span"]


def __getattr__(name):  # lazy analysis modules keep `import factrace` light
    import importlib

    lazy = {"dla": "attribution", "logit_lens": "attribution", "attention_knockout": "attribution",
            "datasets": None, "objects": None}
    if name in lazy:
        mod = importlib.import_module(f".{lazy[name] or name}", __name__)
        return mod if lazy[name] is None else getattr(mod, name)
    raise AttributeError(f"module 'factrace' has no attribute {name!r}")
