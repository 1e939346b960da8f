"""Make the OpenBLAS that the C core was linked against loadable before importing ``_core``.

When the build used scipy-openblas32, its shared library lives inside that package; preloading it
with RTLD_GLOBAL lets the dynamic linker resolve ``_core``'s dependency by soname wherever the
package is installed (the build-time rpath may point into a temporary build environment)."""
import ctypes
import os


def preload() -> None:
    # OpenBLAS's idle threads spin for 2^28 cycles by default, taking the second core from the loops
    # between matrix products; 2^10 measured 15-25% faster forward passes on 2 cores.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")
    try:
        import scipy_openblas32 as sob
    except ImportError:
        return
    lib = os.path.join(sob.get_lib_dir(), sob.get_library(fullname=True))
    if os.path.exists(lib):
        try:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            pass
