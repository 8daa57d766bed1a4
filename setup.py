"""Build of the native kernels; the package metadata lives in pyproject.toml.

The extension is optional: if it cannot be compiled (no C compiler, an unsupported
platform) the install still succeeds and vlm.kernels falls back to numpy.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "vlm/kernels/"


class BuildExt(build_ext):
    """Adds numpy's headers late (numpy is a build requirement, not a setup.py import)."""

    def finalize_options(self):
        super().finalize_options()
        import numpy

        for ext in self.extensions:
            ext.include_dirs.append(numpy.get_include())

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            # The kernels use GCC/Clang attributes and pthreads.
            print("vlm: skipping the native kernels (MSVC is not supported)", file=sys.stderr)
            self.extensions = []
            return
        super().build_extensions()


native = Extension(
    "vlm.kernels._native",
    sources=[
        KERNELS + name
        for name in ("bindings.c", "pool.c", "pack.c", "matmul.c", "attention.c", "decode.c", "matmul_portable.c",
                     "matmul_avx2.c", "matmul_avxvnni.c", "matmul_avx512.c", "attention_portable.c", "attention_avx2.c", "attention_avx512.c",
                     "matmul_neon.c", "matmul_neon_dot.c", "matmul_neon_i8mm.c", "attention_neon.c")
    ],
    depends=[KERNELS + "kernels.h", KERNELS + "pool.h", KERNELS + "attention_impl.h", KERNELS + "matmul_halfpanel.h"],
    # Baseline ISA only: the AVX2 / AVX-512 and the AArch64 dot-product / I8MM kernels carry
    # their own target attributes and are picked at run time, so one build runs on any CPU of
    # the architecture. Each file compiles to nothing on the other architecture.
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native], cmdclass={"build_ext": BuildExt})
