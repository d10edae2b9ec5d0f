"""The one compiled part of annofs; everything else is in pyproject.toml.

The mount's read path checks every fragment it reads against its BLAKE3 hash: one C call
per request, without the GIL (csrc/hashcheck.c), over the BLAKE3 team's own C
implementation (csrc/blake3/, vendored: see csrc/README.md). It is declared here because
setuptools still calls `[tool.setuptools.ext-modules]` in pyproject.toml experimental.
"""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

BLAKE3 = ["csrc/blake3/blake3.c", "csrc/blake3/blake3_dispatch.c",
          "csrc/blake3/blake3_portable.c"]
# The BLAKE3 team's assembly for x86-64 (SysV ABI): faster than their intrinsics compiled
# here (measured: 266 against 433 us per MiB of 16 KiB fragments), and it needs no -m
# flags, which setuptools would pass to every source. dispatch picks by cpuid at run time.
X86_64_ASM = [f"csrc/blake3/blake3_{s}_x86-64_unix.S" for s in ("sse2", "sse41", "avx2", "avx512")]
# Elsewhere the portable code alone (NEON's source is not vendored).
NO_SIMD = [("BLAKE3_NO_SSE2", "1"), ("BLAKE3_NO_SSE41", "1"), ("BLAKE3_NO_AVX2", "1"),
           ("BLAKE3_NO_AVX512", "1"), ("BLAKE3_USE_NEON", "0")]

x86_64 = (platform.machine().lower() in ("x86_64", "amd64") and sys.maxsize > 2**32
          and sys.platform != "win32")


class BuildExt(build_ext):
    """build_ext that hands .S files to the C compiler (gcc and clang assemble them)."""

    def build_extensions(self) -> None:
        self.compiler.src_extensions.append(".S")
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "annofs.content._hashcheck",
        sources=["csrc/hashcheck.c", *BLAKE3, *(X86_64_ASM if x86_64 else [])],
        include_dirs=["csrc"],
        define_macros=[] if x86_64 else NO_SIMD,
        extra_compile_args=["-O3"],
    )],
    cmdclass={"build_ext": BuildExt},
)
