"""factrace: find where and how decoder-only transformers recall facts.

    >>> import factrace
    >>> m = factrace.load("smollm2")                       # a model an installed package ships
    >>> r = m.run(m.encode("The Eiffel Tower is located in the city of"), capture=True)
    >>> r.attn_out.shape, r.head_out.shape                 # (L, T, d), (L, H, T, d)

The package in layers (see docs/ARCHITECTURE.md):
    ``factrace.io``        checkpoints in: config, the architecture table, safetensors, GGUF, tokenizers,
                           packaged models, :func:`load`;
    ``factrace.model``     the model and its runs; ``factrace.interventions``: what can be done to a run;
    ``factrace.methods``   causal tracing, severing, knockout and Gini, DLA, logit lens, attention knockout;
    ``factrace.study``     datasets, objects rate, dataset-scale tracing, the cross-architecture report, Dask;
    ``factrace.cli``       the ``factrace`` command line.
Only the model layer is imported eagerly; the methods and the study load on first use.
"""
from ._blas import preload as _preload

_preload()

from . import _core  # noqa: E402
from .errors import (CheckpointError, ConfigError, DatasetDownloadError, FactraceError, GGUFError,  # noqa: E402
                     HubError, InputError, MissingDependencyError, ModelNotFoundError, ModelNotInstalledError,
                     ModelTooLargeError)
from .interventions import Intervention, add, block_attention, freeze, set_values, zero  # noqa: E402
from .io.config import SUPPORTED_ARCHS, ModelConfig  # noqa: E402
from .io.load import load  # noqa: E402
from .model import Model, RunResult, get_num_threads, set_num_threads  # noqa: E402

BLAS = _core.BLAS
__version__ = "0.2.0"

# public name -> module that defines it (imported on first use: keeps `import factrace` light)
_LAZY = {
    "trace": "methods.tracing", "trace_all": "methods.tracing", "TraceResult": "methods.tracing",
    "noise_level": "methods.tracing", "embedding_noise": "methods.tracing", "subject_span": "methods._common",
    "sever": "methods.severing", "SeverResult": "methods.severing",
    "knockout": "methods.knockout", "gini": "methods.knockout", "KnockoutResult": "methods.knockout",
    "dla": "methods.dla", "dla_dataset": "methods.dla", "DLAResult": "methods.dla",
    "head_source_split": "methods.dla", "head_source_project": "methods.dla",
    "logit_lens": "methods.lens", "LensResult": "methods.lens", "attribute_extraction_rate": "methods.lens",
    "attention_knockout": "methods.attention_knockout",
    "attention_knockout_dataset": "methods.attention_knockout",
    "activation_patching": "methods.patching", "PatchingResult": "methods.patching",
    "path_patching": "methods.patching", "PathPatchingResult": "methods.patching",
    "mechanism_ablation": "methods.mechanisms", "MechanismAblation": "methods.mechanisms",
    "gradients": "methods.gradients", "Gradients": "methods.gradients",
    "attribution_patching": "methods.attribution_patching", "AtPResult": "methods.attribution_patching",
    "edge_attribution": "methods.edge_attribution", "EdgeResult": "methods.edge_attribution",
    "trace_dataset": "study.dataset_trace", "known_facts": "study.dataset_trace",
    "DatasetTrace": "study.dataset_trace",
    "run_report": "study.report", "StudySettings": "study.settings",
}
_LAZY_MODULES = {"datasets": "study.datasets", "objects": "study.objects", "report": "study.report",
                 "packaged": "io.packaged", "methods": "methods", "study": "study", "cli": "cli"}

__all__ = ["load", "Model", "RunResult", "ModelConfig", "SUPPORTED_ARCHS", "FactraceError", "ConfigError",
           "CheckpointError", "GGUFError", "HubError", "InputError", "ModelNotFoundError", "ModelNotInstalledError",
           "ModelTooLargeError", "MissingDependencyError", "DatasetDownloadError", "Intervention", "add",
           "set_values", "freeze", "zero", "block_attention", "set_num_threads", "get_num_threads",
           "BLAS"] + sorted(_LAZY)


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{_LAZY_MODULES[name]}", __name__)
    raise AttributeError(f"module 'factrace' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_MODULES))
