"""A hostile VM for isolation tests: a QEMU and guest that do, in a loop, what the issue's
table lists (huge statistics buffers, looping indirect tables, malformed chains resubmitted
at once, an unread backend channel), then shrink their own memory under the daemon.

    python -m tests.hostileguest SOCKET SECONDS
"""

from __future__ import annotations

import os
import sys
import time

from tests.frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, Frontend, Guest, GuestRam, MiB


def main(path: str, seconds: float) -> None:
    ram = GuestRam(low=64 * MiB, high=512 * MiB)
    frontend = Frontend(path, timeout=30)
    guest = Guest(frontend, ram)  # never reads its backend channel
    guest.start()
    report, stats = guest.rings["reporting"], guest.rings["stats"]
    table = 48 * MiB
    ram.write(
        table, b"".join(DESC.pack(0, 4096, F_WRITE | F_NEXT, (i + 1) & 0xFFFF) for i in range(8192))
    )
    print("started", flush=True)
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        # 64 malformed chains at once: a loop of one descriptor, then an indirect table of
        # 8192 descriptors that all chain on.
        for slot in range(64):
            if slot % 2:
                report.write_desc(slot, table, 16 * 8192, F_INDIRECT)
            else:
                report.write_desc(slot, 32 * MiB, 2 * MiB, F_WRITE | F_NEXT, slot)
            report.publish(slot)
        report.notify()
        report.wait_used(64, timeout=30)
        # A statistics buffer of 8 x 64 MiB, offered again at once.
        stats.add_chain(
            [(4 * 1024 * MiB + i * 64 * MiB, 64 * MiB) for i in range(8)], writable=False
        )
        stats.notify()
        rounds += 1
    os.ftruncate(ram.regions[0].fd, 0)  # guest memory shrunk under the daemon
    report.notify()
    print(f"rounds={rounds}", flush=True)
    time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
