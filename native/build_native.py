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

CDEF = """
struct balloond_range {
    int fd;
    uint64_t offset;
    uint64_t length;
    void *addr;
};

size_t balloond_discard(const struct balloond_range *ranges, size_t n, int32_t *errors);
int balloond_backing(int fd, uint64_t *fs_type, uint64_t *block_size);

size_t balloond_coalesce(uint32_t *frames, size_t n, unsigned int shift, uint64_t *spans);

struct balloond_plan_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t page;
    uint64_t offset;
    uint64_t host;
    int64_t fd;
};
struct balloond_skip {
    uint64_t gpa;
    uint64_t length;
    uint64_t page;
};
int balloond_plan(const struct balloond_plan_region *regions, size_t nregions,
                  const uint64_t *spans, size_t nspans, struct balloond_range *ranges,
                  size_t *nranges, struct balloond_skip *skips, size_t *nskips,
                  uint64_t *total);

int balloond_guard_sigbus(void);
int balloond_copy(uintptr_t destination, uintptr_t source, size_t length);
int32_t balloond_load_u16_acquire(uintptr_t address);
int balloond_store_u16_release(uintptr_t address, uint16_t value);
void balloond_full_barrier(void);

struct balloond_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host;
};
struct balloond_walk {
    uintptr_t table;
    uint32_t size;
    uint32_t head;
    uint32_t indirect;
    uint32_t count;
    uint32_t readable;
    uint32_t read;
    uint64_t detail[2];
};
int balloond_walk_chain(struct balloond_walk *walk, const struct balloond_region *regions,
                        size_t nregions, uint64_t *out);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "balloond._native",
    '#include "discard.h"\n#include "ring.h"',
    sources=[str(NATIVE / "discard.c"), str(NATIVE / "ring.c")],
    include_dirs=[str(NATIVE)],
    depends=[str(NATIVE / "discard.h"), str(NATIVE / "ring.h")],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=".", verbose=True)
