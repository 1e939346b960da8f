"""Dask glue: facts traced on the workers of a ``dask.distributed`` cluster, each worker loading the model
once (from ``Model.source``). Used by :func:`factrace.trace_dataset` with ``client=``.
"""
from __future__ import annotations

_WORKER_MODELS: dict = {}


def _worker_chunk(source, items, kw):
    """Dask task: load the model once per worker process, trace a share of the facts."""
    from ..io.load import load
    from .dataset_trace import _trace_rows

    if source not in _WORKER_MODELS:
        _WORKER_MODELS[source] = load(source)
    m = _WORKER_MODELS[source]
    out = []
    for fid, rec, answer in items:
        out.append(_trace_rows(m, fid, rec, answer, **kw))
    return out

