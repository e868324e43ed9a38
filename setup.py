"""Build hook for the optional C kernels (see src/microscale/kernels). Metadata lives in pyproject.toml.

The extension microscale.kernels._mxkernels is optional: when no C compiler (or no OpenMP) is found
the install still succeeds and microscale falls back to its reference quantizer with one warning.
OpenMP is tried first and dropped if the compiler rejects it. No -march=native: the C file carries
AVX-512 / AVX2 / baseline variants and picks one at import time.
"""
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class BuildExt(build_ext):
    """Compile with OpenMP when the compiler supports it, else without; never fail the install."""

    def build_extension(self, ext):
        base = list(ext.extra_compile_args)
        base_link = list(ext.extra_link_args)
        attempts = [(["-fopenmp"], ["-fopenmp"]), ([], [])]
        if sys.platform == "win32":
            attempts = [(["/openmp"], []), ([], [])]
        for i, (cflags, lflags) in enumerate(attempts):
            ext.extra_compile_args = base + cflags
            ext.extra_link_args = base_link + lflags
            try:
                return super().build_extension(ext)
            except Exception as e:  # noqa: BLE001  (CompileError, LinkError, missing compiler)
                print(f"microscale: building {ext.name} {'with' if cflags else 'without'} OpenMP failed: {e}",
                      file=sys.stderr)
                if i == len(attempts) - 1:
                    print("microscale: C kernels not built; the reference quantizer will be used",
                          file=sys.stderr)
                    return None


_cflags = [] if sys.platform == "win32" else ["-O3", "-g0", "-std=c11", "-fno-strict-aliasing", "-fno-trapping-math", "-Wno-unknown-pragmas"]
if _X86 and sys.platform != "win32":
    _cflags.append("-mprefer-vector-width=512")

setup(
    ext_modules=[Extension("microscale.kernels._mxkernels", ["src/microscale/kernels/_mxkernels.c",
                                                               "src/microscale/kernels/_mxloops.c",
                                                               "src/microscale/kernels/_mxgemm.c",
                                                               "src/microscale/kernels/_mxconv.c"],
                           depends=["src/microscale/kernels/_mxscalar.h", "src/microscale/kernels/_mxpack.h",
                                    "src/microscale/kernels/_mxloops.h"],
                           extra_compile_args=_cflags, optional=True)],
    cmdclass={"build_ext": BuildExt},
)
