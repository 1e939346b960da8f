"""Optional packages, imported on first use: ``need("pandas")`` returns the module or raises
:class:`~factrace.errors.MissingDependencyError` whose one-line message gives the pip command.

Example:
    >>> from factrace._optional import need
    >>> pd = need("pandas", "DataFrames")                     # doctest: +SKIP
"""
from __future__ import annotations

import importlib

from .errors import MissingDependencyError

# top-level module -> (pip requirement, factrace extra that installs it or None)
PACKAGES = {
    "pandas": ("pandas", "analysis"),
    "matplotlib": ("matplotlib", "analysis"),
    "pyarrow": ("pyarrow", "analysis"),
    "sentence_transformers": ("sentence-transformers", "semantic"),
    "rank_bm25": ("rank-bm25", "semantic"),
    "dask": ("dask[distributed]", "dask"),
    "distributed": ("dask[distributed]", "dask"),
    "torch": ("torch", None),
    "transformers": ("transformers", "oracle"),
    "gguf": ("gguf", "oracle"),
}


def pip_command(module: str) -> str:
    """The pip command that installs the package providing ``module`` (e.g. ``pip install pandas``)."""
    top = module.split(".")[0]
    req, extra = PACKAGES.get(top, (top.replace("_", "-"), None))
    cmd = f"pip install '{req}'" if "[" in req else f"pip install {req}"
    return cmd + (f" (or factrace's [{extra}] extra)" if extra else "")


def missing(module: str, what: str | None = None, cause: BaseException | None = None) -> MissingDependencyError:
    """The MissingDependencyError for ``module`` (not raised): ``<what> needs <package>, which is not
    installed: pip install <package>``."""
    top = module.split(".")[0]
    req = PACKAGES.get(top, (top,))[0]
    msg = f"{what or 'this'} needs {req.split('[')[0]}, which is not installed: {pip_command(top)}"
    if cause is not None and getattr(cause, "name", None) not in (None, top, module):
        msg += f" (importing {module} failed: {cause})"  # installed, but one of its own dependencies is not
    return MissingDependencyError(msg, name=top)


def need(module: str, what: str | None = None):
    """Import ``module`` (e.g. ``"pandas"``, ``"matplotlib.figure"``), or raise MissingDependencyError
    naming what needs it and the pip command."""
    try:
        return importlib.import_module(module)
    except MissingDependencyError:
        raise
    except ImportError as e:
        raise missing(module, what, e) from e
