"""cffi builder for `balloond._native` (API mode, out of line): discarding and ring access.

setuptools runs this through `cffi_modules` in setup.py when the package is built or
installed. It can also be run by hand from the repository root:
`python native/build_native.py` compiles the module into the source tree.
"""

from pathlib import Path

from cffi import FFI

# Paths stay relative to the repository root, where setup.py runs; setuptools
# refuses absolute source paths in some modes.
NATIVE = Path("native")

HEADERS = (NATIVE / "discard.h", NATIVE / "ring.h")


def _declarations(header: Path) -> str:
    """A header as cffi's cdef reads it: everything but the preprocessor lines (the include
    guard and the includes), so the headers stay the one statement of the interface."""
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


CDEF = "\n".join(_declarations(header) for header in HEADERS)

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "balloond._native",
    '#include "discard.h"\n#include "ring.h"',
    sources=[str(NATIVE / "discard.c"), str(NATIVE / "ring.c")],
    include_dirs=[str(NATIVE)],
    depends=[str(header) for header in HEADERS],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=".", verbose=True)
