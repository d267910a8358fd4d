"""cffi builder for `balloond._native` (API mode, out of line).

setuptools runs this through `cffi_modules` in setup.py when the package is built or
installed. It can also be run by hand from the repository root:
`python native/build_native.py` compiles the module into the source tree.
"""

from pathlib import Path

from cffi import FFI

# Paths stay relative to the repository root, where setup.py runs; setuptools
# refuses absolute source paths in some modes.
NATIVE = Path("native")

CDEF = """
struct balloond_range {
    int fd;
    uint64_t offset;
    uint64_t length;
    void *addr;
};

size_t balloond_discard(const struct balloond_range *ranges, size_t n, int32_t *errors);
int balloond_backing(int fd, uint64_t *fs_type, uint64_t *block_size);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "balloond._native",
    '#include "discard.h"',
    sources=[str(NATIVE / "discard.c")],
    include_dirs=[str(NATIVE)],
    depends=[str(NATIVE / "discard.h")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=".", verbose=True)
