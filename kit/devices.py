"""QEMU arguments for the balloon devices the end-to-end tests compare."""

from __future__ import annotations

from pathlib import Path


def builtin_balloon(free_page_reporting: bool = True) -> tuple[str, ...]:
    """QEMU's own virtio-balloon device."""
    reporting = "on" if free_page_reporting else "off"
    return ("-device", f"virtio-balloon-pci,free-page-reporting={reporting}")


def vhost_user_balloon(
    socket_path: Path, *, num_vqs: int = 4, vq_size: int = 128, server: bool = False
) -> tuple[str, ...]:
    """QEMU's generic vhost-user device (QEMU >= 10.2) as a balloon served by balloond.

    QEMU connects as a client, so the backend must already listen on ``socket_path``; with
    ``server`` QEMU listens there instead and waits at start for balloond (``--connect``).
    ``num_vqs=4`` fits a backend offering STATS_VQ and PAGE_REPORTING without FREE_PAGE_HINT
    (queue indices are compact: inflate 0, deflate 1, stats 2, reporting 3).
    """
    return (
        "-chardev",
        f"socket,id=balloon,path={socket_path}" + (",server=on" if server else ""),
        "-device",
        "vhost-user-test-device-pci,chardev=balloon,virtio-id=5,"
        f"num_vqs={num_vqs},vq_size={vq_size},config_size=16",
    )


def root_port(port: str = "rp-balloon", *, chassis: int = 1, slot: int = 1) -> tuple[str, ...]:
    """A PCIe root port. On q35 only a device behind one can be hot-unplugged (``device_del``);
    a QEMU that receives a migrated VM needs the same ports as the source."""
    return ("-device", f"pcie-root-port,id={port},chassis={chassis},slot={slot}")


def vhost_user_balloon_unpluggable(
    socket_path: Path,
    *,
    port: str = "rp-balloon",
    device_id: str = "balloon0",
    chardev_id: str = "balloon",
    num_vqs: int = 4,
    vq_size: int = 128,
    chassis: int = 1,
    slot: int = 1,
) -> tuple[str, ...]:
    """:func:`vhost_user_balloon` behind its own root port, with a device id: the balloon
    ``balloond-migrate`` unplugs before a migration (docs/migration.md)."""
    return (
        *root_port(port, chassis=chassis, slot=slot),
        "-chardev",
        f"socket,id={chardev_id},path={socket_path}",
        "-device",
        f"vhost-user-test-device-pci,id={device_id},bus={port},chardev={chardev_id},"
        f"virtio-id=5,num_vqs={num_vqs},vq_size={vq_size},config_size=16",
    )
