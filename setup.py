"""Build script for factrace's C core.

BLAS selection (printed during the build and recorded in ``factrace._core.BLAS``):

1. ``scipy-openblas32`` from PyPI (default; needs nothing but pip). The extension links the wheel's
   ``libscipy_openblas.so`` and finds it at run time through an ``$ORIGIN``-relative rpath and a preload
   in ``factrace/_blas.py``.
2. A system OpenBLAS found with ``pkg-config openblas`` (set ``FACTRACE_BLAS=system`` to force it, or it
   is used when scipy-openblas32 cannot be imported at build time).
"""
import os
import shlex
import subprocess
import sys

import numpy as np
from setuptools import Extension, setup

DEBUG = os.environ.get("FACTRACE_DEBUG", "") == "1"
SANITIZE = os.environ.get("FACTRACE_SANITIZE", "")  # e.g. "address,undefined"


def blas_flags():
    choice = os.environ.get("FACTRACE_BLAS", "auto")
    if choice in ("auto", "scipy-openblas32"):
        try:
            import scipy_openblas32 as sob

            lib_dir = sob.get_lib_dir()
            return dict(
                name="scipy-openblas32 " + getattr(sob, "__version__", "?"),
                include_dirs=[sob.get_include_dir()],
                library_dirs=[lib_dir],
                libraries=[sob.get_library()],
                define_macros=[("FACTRACE_BLAS_SCIPY", "1")],
                extra_link_args=["-Wl,-rpath,$ORIGIN/../scipy_openblas32/lib", "-Wl,-rpath," + lib_dir],
            )
        except ImportError:
            if choice != "auto":
                raise
    try:
        cflags = shlex.split(subprocess.check_output(["pkg-config", "--cflags", "openblas"], text=True))
        libs = shlex.split(subprocess.check_output(["pkg-config", "--libs", "openblas"], text=True))
        version = subprocess.check_output(["pkg-config", "--modversion", "openblas"], text=True).strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        sys.exit(
            "factrace: no OpenBLAS found. `pip install scipy-openblas32` (default) or install a system "
            f"OpenBLAS with pkg-config metadata (Debian: apt-get install libopenblas-dev). ({exc})"
        )
    return dict(
        name="system OpenBLAS " + version + " (pkg-config)",
        include_dirs=[f[2:] for f in cflags if f.startswith("-I")],
        library_dirs=[f[2:] for f in libs if f.startswith("-L")],
        libraries=[f[2:] for f in libs if f.startswith("-l")],
        define_macros=[],
        extra_link_args=[],
    )


blas = blas_flags()
print(f"factrace: building with BLAS = {blas['name']}")

cflags = ["-std=c11", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
          "-fno-strict-aliasing", "-fno-trapping-math"]  # no FP traps: lets branch-free loops vectorize
if DEBUG:
    cflags = [f for f in cflags if f != "-O3"] + ["-O1", "-g", "-fno-omit-frame-pointer"]
ldflags = []
if SANITIZE:
    cflags += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer", "-g"]
    ldflags += [f"-fsanitize={SANITIZE}"]

common = dict(
    include_dirs=["csrc", np.get_include()] + blas["include_dirs"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_20_API_VERSION"),
                   ("FACTRACE_BLAS_NAME", '"' + blas["name"] + '"')] + blas["define_macros"],
    extra_compile_args=cflags,
    extra_link_args=ldflags,
)

# Every matrix product (csrc/matmul.c, weights as stored) and the loops between them run on a pthread pool
# of csrc/pool.c owned by each model (factrace.Model.set_num_threads); OpenBLAS is kept single-threaded
# and called from the pool's threads. (Not OpenMP: in a process that imported torch first, torch's
# spinning libgomp would serve the parallel regions and starve the other threads.)
core = Extension(
    "factrace._core",
    sources=["csrc/module.c", "csrc/forward.c", "csrc/backward.c", "csrc/matmul.c", "csrc/quant.c", "csrc/pool.c", "csrc/convert.c"],
    library_dirs=blas["library_dirs"],
    libraries=blas["libraries"] + ["m"],
    **{**common, "extra_compile_args": cflags + ["-pthread"],
       "extra_link_args": ldflags + ["-pthread"] + blas["extra_link_args"]},
)
# Matrix products with weights as stored (csrc/matmul.c) and their test/benchmark entry points.
kernels = Extension(
    "factrace._kernels",
    sources=["csrc/kernels_module.c", "csrc/matmul.c", "csrc/quant.c", "csrc/pool.c"],
    library_dirs=blas["library_dirs"],
    libraries=blas["libraries"] + ["m"],
    **{**common, "extra_compile_args": cflags + ["-pthread"],
       "extra_link_args": ldflags + ["-pthread"] + blas["extra_link_args"]},
)
gguf_sources = [p for p in ("csrc/gguf.c", "csrc/quant.c", "csrc/gguf_module.c") if os.path.exists(p)]
exts = [core, kernels]
if gguf_sources:
    exts.append(Extension("factrace._gguf", sources=gguf_sources, libraries=["m"], **common))

if os.path.exists("csrc/attribution.c"):
    exts.append(Extension("factrace._attrib", sources=["csrc/attribution.c"],
                          library_dirs=blas["library_dirs"], libraries=blas["libraries"] + ["m"],
                          **{**common, "extra_link_args": ldflags + blas["extra_link_args"]}))

setup(ext_modules=exts)
