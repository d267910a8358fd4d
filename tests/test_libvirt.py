"""contrib/libvirt: the example domain, and the hook run as libvirt runs it.

The hook is executed as a program, with what libvirt gives a hook: the arguments ``DOMAIN
OPERATION SUB-OPERATION EXTRA``, the domain's XML on stdin (attributes in single quotes, a
``"`` in a value written ``&quot;``, as libvirt 9.0 wrote it), and a clean environment
(LC_ALL=C, PATH, HOME) plus BALLOOND and BALLOOND_CONTROL, which point it at a real
``balloond serve`` of the test. No libvirtd runs here: see contrib/libvirt/README.md for what
was checked under a real one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from balloond.control import request
from balloond.wire import Request
from tests.frontend import Frontend

REPO = Path(__file__).resolve().parent.parent
CONTRIB = REPO / "contrib" / "libvirt"
DOMAIN_XML = CONTRIB / "balloond-domain.xml"
HOOK = CONTRIB / "hooks" / "qemu"
QEMU_NS = "{http://libvirt.org/schemas/domain/qemu/1.0}"
EXAMPLE_SOCKET = "/run/balloond/vm0.sock"
APT = "apt-get install libvirt-clients libxml2-utils"


def load_hook() -> ModuleType:
    """The hook as a module (it is a script without a .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("balloond_libvirt_hook", str(HOOK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def as_libvirt_writes_it(text: str) -> str:
    """The domain XML as libvirt formats it for a hook: no comments, and ``"`` in attribute
    values (the JSON of -device) as ``&quot;``."""
    text = re.sub(r"<!--.*?-->\s*", "", text, flags=re.S)
    return re.sub(
        r"value='([^']*)'", lambda m: "value='" + m.group(1).replace('"', "&quot;") + "'", text
    )


def example(socket_path: str | None = None) -> str:
    """The example domain as libvirt feeds it to the hook, its socket moved to
    ``socket_path`` (Unix socket paths are short: a test's own directory is too deep)."""
    text = DOMAIN_XML.read_text()
    assert text.count(EXAMPLE_SOCKET) == 1, "the example's socket path is in its chardev only"
    if socket_path is not None:
        text = text.replace(EXAMPLE_SOCKET, socket_path)
    return as_libvirt_writes_it(text)


def without_balloond(text: str) -> str:
    """The same domain without its <qemu:commandline>: an ordinary libvirt domain."""
    stripped = re.sub(r"\s*<qemu:commandline>.*</qemu:commandline>", "", text, flags=re.S)
    assert "vhost-user" not in stripped
    return stripped


# -- the example domain -------------------------------------------------------------------


def virt_xml_validate(path: Path) -> subprocess.CompletedProcess[str]:
    missing = [tool for tool in ("virt-xml-validate", "xmllint") if shutil.which(tool) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the libvirt tests validate the example domain "
            f"with libvirt's schemas (Debian: {APT})"
        )
    return subprocess.run(
        ["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, timeout=60
    )


def test_the_example_domain_is_valid_libvirt_xml() -> None:
    result = virt_xml_validate(DOMAIN_XML)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validates" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("<memballoon model='none'/>", "<memballoon model='balloond'/>"),
        ("<qemu:arg value='-chardev'/>", "<qemu:arg/>"),
        ("<source type='memfd'/>", "<source type='memfd' share='yes'/>"),
    ],
)
def test_the_validator_does_reject_a_broken_domain(tmp_path: Path, good: str, bad: str) -> None:
    text = DOMAIN_XML.read_text()
    assert good in text
    broken = tmp_path / "broken.xml"
    broken.write_text(text.replace(good, bad, 1))
    assert virt_xml_validate(broken).returncode != 0


def test_the_example_domain_has_what_balloond_needs() -> None:
    domain = ET.parse(DOMAIN_XML).getroot()
    name = domain.findtext("name")
    os_type = domain.find("os/type")
    assert os_type is not None and os_type.get("machine") == "q35"
    backing = domain.find("memoryBacking")
    assert backing is not None
    assert [(e.tag, dict(e.attrib)) for e in backing] == [
        ("source", {"type": "memfd"}),
        ("access", {"mode": "shared"}),
    ]
    balloon = domain.find("devices/memballoon")
    assert balloon is not None and balloon.get("model") == "none"
    assert domain.find("devices/controller[@model='pcie-root-port']") is None, (
        "libvirt would put its own devices on a port of the XML that looks empty to it"
    )

    args = [a.get("value", "") for a in domain.iterfind(f"{QEMU_NS}commandline/{QEMU_NS}arg")]
    assert args[0::2] == ["-chardev", "-device", "-device"]
    chardev, port, device = args[1], json.loads(args[3]), json.loads(args[5])
    assert chardev == f"socket,id=balloond0,path=/run/balloond/{name}.sock"
    assert port["driver"] == "pcie-root-port" and port["chassis"] > 32
    assert device == {
        "driver": "vhost-user-test-device-pci",
        "id": "balloond0",
        "chardev": "balloond0",
        "virtio-id": 5,
        "num_vqs": 4,
        "vq_size": 128,
        "config_size": 16,
        "bus": port["id"],
    }

    hook = load_hook()
    for text in (DOMAIN_XML.read_text(), example()):
        assert hook.balloon_socket(text.encode()) == (EXAMPLE_SOCKET, False)


# -- what the hook takes from a domain's command line ------------------------------------


@pytest.mark.parametrize(
    ("text", "implied", "expected"),
    [
        ("socket,id=c,path=/a,,b", "backend", {"backend": "socket", "id": "c", "path": "/a,b"}),
        ("socket,server,path=/p", "backend", {"backend": "socket", "server": "on", "path": "/p"}),
        ("driver=virtio-rng-pci,id=r", "driver", {"driver": "virtio-rng-pci", "id": "r"}),
        ('{"driver":"x","virtio-id":5,"a":true}', "", {"driver": "x", "virtio-id": "5", "a": "on"}),
        ("{not json", "driver", {}),
    ],
)  # fmt: skip
def test_qemu_option_syntax(text: str, implied: str, expected: dict[str, str]) -> None:
    assert load_hook().options(text, implied) == expected


def commandline(*args: str) -> bytes:
    values = "".join(f"<qemu:arg value='{arg}'/>" for arg in args)
    return (
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
        f"<name>vm</name><qemu:commandline>{values}</qemu:commandline></domain>"
    ).encode()


BALLOON = "vhost-user-test-device-pci,chardev=c0,virtio-id=5,num_vqs=4,vq_size=128,config_size=16"
SOCK = "/run/b/vm.sock"
CHARDEV = f"socket,id=c0,path={SOCK}"


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        (commandline("-chardev", CHARDEV, "-device", BALLOON), (SOCK, False)),
        (commandline("--chardev", f"{CHARDEV},server=on", "--device", BALLOON), (SOCK, True)),
        (commandline("-chardev", CHARDEV, "-device", f"{BALLOON},virtio-id=0x5"), (SOCK, False)),
        (commandline("-chardev", CHARDEV, "-device", f"{BALLOON},virtio-id=26"), None),
        (commandline("-chardev", CHARDEV, "-device", "virtio-balloon-pci"), None),
        (commandline("-device", "vhost-user-test-device-pci"), None),
        (b"<domain><name>vm</name></domain>", None),
    ],
)  # fmt: skip
def test_which_domains_are_balloond_domains(xml: bytes, expected: object) -> None:
    assert load_hook().balloon_socket(xml) == expected


@pytest.mark.parametrize(
    ("xml", "says"),
    [
        (commandline("-device", BALLOON), "chardev 'c0' is no '-chardev socket"),
        (commandline("-chardev", "pty,id=c0", "-device", BALLOON), "chardev 'c0' is no"),
        (commandline("-chardev", "socket,id=c0,path=vm.sock", "-device", BALLOON), "not absolute"),
        (commandline("-chardev", CHARDEV, "-device", BALLOON, "-device", BALLOON), "2 balloond"),
        (b"<domain><name>vhost-user-test-device-pci", "cannot read the domain XML"),
    ],
)  # fmt: skip
def test_a_broken_balloond_domain_is_refused(xml: bytes, says: str) -> None:
    hook = load_hook()
    with pytest.raises(hook.HookError, match=re.escape(says)):
        hook.balloon_socket(xml)


# -- the hook against a real daemon --------------------------------------------------------

_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: Unix socket paths have at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="balloond-lv-", dir="/tmp"))
    yield path
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()
    shutil.rmtree(path, ignore_errors=True)


def start_daemon(directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``balloond serve`` with its control socket in ``directory``, once it listens."""
    log = directory / "daemon.log"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "balloond", "serve", "--control-socket",
             str(directory / "control.sock"), *extra],
            stderr=stderr,
            cwd=REPO,
        )  # fmt: skip
    _STARTED.append(process)
    deadline = time.monotonic() + 30
    while "control on" not in log.read_text(errors="replace"):
        assert process.poll() is None, f"balloond exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"balloond did not start: {log.read_text()}"
        time.sleep(0.05)
    return process


def balloond_command(directory: Path) -> Path:
    """The ``balloond`` command the hook runs: this checkout's, with this Python."""
    path = directory / "balloond"
    path.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} "
        f'exec {shlex.quote(sys.executable)} -m balloond "$@"\n'
    )
    path.chmod(0o755)
    return path


def tripwire(directory: Path) -> Path:
    """A ``balloond`` that only records that it was called, and fails."""
    path = directory / "tripwire"
    path.write_text(f'#!/bin/sh\necho "$@" >> {directory}/called\necho "tripwire" >&2\nexit 1\n')
    path.chmod(0o755)
    return path


def hook_env(directory: Path, command: Path | None = None, **extra: str) -> dict[str, str]:
    """What libvirt passes a hook, and where the test's daemon is."""
    return {
        "LC_ALL": "C",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "BALLOOND": str(command or balloond_command(directory)),
        "BALLOOND_CONTROL": str(directory / "control.sock"),
        **extra,
    }


def run_hook(
    env: dict[str, str], domain: str, operation: str, sub: str, xml: str, extra: str = "-"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOOK), domain, operation, sub, extra],
        input=xml,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def devices(directory: Path) -> dict[str, dict[str, Any]]:
    status = request(str(directory / "control.sock"), {"command": "status"})
    return {device["device"]: device for device in status["devices"]}


def is_socket(path: Path) -> bool:
    return path.exists() and stat.S_ISSOCK(os.stat(path).st_mode)


def quiet_success(result: subprocess.CompletedProcess[str]) -> bool:
    return (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_hook_is_an_executable_script() -> None:
    assert os.access(HOOK, os.X_OK), "libvirt skips a hook it cannot execute"
    interpreter = HOOK.read_text().splitlines()[0].removeprefix("#!")
    assert os.access(interpreter, os.X_OK), f"{interpreter} (the hook's interpreter) is missing"


def test_a_domain_lifecycle_adds_and_removes_its_device(short_dir: Path) -> None:
    start_daemon(short_dir)
    env = hook_env(short_dir)
    sock = short_dir / "vm0.sock"
    xml = example(str(sock))

    assert quiet_success(run_hook(env, "vm0", "prepare", "begin", xml))
    assert devices(short_dir)["vm0"]["socket"] == str(sock)
    assert is_socket(sock)
    # Once more (libvirtd restarted, a start that failed half-way): served already, fine.
    assert quiet_success(run_hook(env, "vm0", "prepare", "begin", xml))
    assert list(devices(short_dir)) == ["vm0"]

    # What libvirt calls between prepare and release leaves the device as it is; migrate
    # and restore would take anything printed as a new domain XML.
    for operation, sub in [("start", "begin"), ("started", "begin"), ("reconnect", "begin"),
                           ("migrate", "begin"), ("restore", "begin"), ("attach", "begin"),
                           ("stopped", "end")]:  # fmt: skip
        assert quiet_success(run_hook(env, "vm0", operation, sub, xml)), operation
        assert list(devices(short_dir)) == ["vm0"], operation

    assert quiet_success(run_hook(env, "vm0", "release", "end", xml, "destroyed"))
    assert devices(short_dir) == {}
    assert not sock.exists()
    # Released twice (or after balloond lost the device): nothing to do.
    assert quiet_success(run_hook(env, "vm0", "release", "end", xml))


def test_a_chardev_with_server_on_has_balloond_connect(short_dir: Path) -> None:
    start_daemon(short_dir)
    env = hook_env(short_dir)
    sock = short_dir / "vm2.sock"
    xml = example(str(sock)).replace(f"path={sock}", f"path={sock},server=on,wait=off")

    assert quiet_success(run_hook(env, "vm2", "prepare", "begin", xml))
    device = devices(short_dir)["vm2"]
    assert (device["mode"], device["socket"]) == ("connect", str(sock))
    assert quiet_success(run_hook(env, "vm2", "release", "end", xml))
    assert devices(short_dir) == {}


def test_release_waits_for_balloond_to_see_qemu_go(short_dir: Path) -> None:
    start_daemon(short_dir)
    env = hook_env(short_dir)
    sock = short_dir / "vm0.sock"
    xml = example(str(sock))
    assert quiet_success(run_hook(env, "vm0", "prepare", "begin", xml))

    qemu = Frontend(str(sock))  # the domain's QEMU, as far as balloond can tell
    assert qemu.u64(Request.GET_FEATURES) & (1 << 32)
    assert devices(short_dir)["vm0"]["connected"] is True
    # QEMU has gone when libvirt releases the domain, but balloond may not have seen its
    # connection close yet: here it closes while the hook runs.
    (short_dir / "domain.xml").write_text(xml)
    with open(short_dir / "domain.xml") as stdin:
        release = subprocess.Popen(
            [str(HOOK), "vm0", "release", "end", "shutdown"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    time.sleep(1.0)
    qemu.close()
    stdout, stderr = release.communicate(timeout=60)
    assert (release.returncode, stdout, stderr) == (0, "", "")
    assert devices(short_dir) == {}


def test_release_leaves_a_device_whose_vm_stays_connected(short_dir: Path) -> None:
    start_daemon(short_dir)
    env = hook_env(short_dir)
    sock = short_dir / "vm0.sock"
    xml = example(str(sock))
    assert quiet_success(run_hook(env, "vm0", "prepare", "begin", xml))
    qemu = Frontend(str(sock))
    try:
        assert qemu.u64(Request.GET_FEATURES) & (1 << 32)
        started = time.monotonic()
        result = run_hook(env, "vm0", "release", "end", xml)
        assert time.monotonic() - started < 15
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("balloond hook: vm0: balloond still sees a VM on ")
        assert "balloond remove --force vm0" in result.stderr
        assert devices(short_dir)["vm0"]["connected"] is True, "never forced"
    finally:
        qemu.close()


def test_a_socket_served_already_is_fine_and_left_alone(short_dir: Path) -> None:
    sock = short_dir / "vm0.sock"
    start_daemon(short_dir, "--socket-path", f"configured={sock}")
    env = hook_env(short_dir)
    xml = example(str(sock))

    assert quiet_success(run_hook(env, "vm0", "prepare", "begin", xml))
    assert list(devices(short_dir)) == ["configured"]
    assert quiet_success(run_hook(env, "vm0", "release", "end", xml))
    assert list(devices(short_dir)) == ["configured"], "not the hook's to remove"
    assert is_socket(sock)


def test_a_name_serving_another_socket_is_refused(short_dir: Path) -> None:
    other = short_dir / "other.sock"
    start_daemon(short_dir, "--socket-path", f"vm0={other}")
    env = hook_env(short_dir)
    xml = example(str(short_dir / "vm0.sock"))

    result = run_hook(env, "vm0", "prepare", "begin", xml)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"balloond hook: vm0: balloond device 'vm0' serves {other}, not {short_dir}/vm0.sock: "
        "remove it first (balloond remove vm0)\n"
    )
    assert quiet_success(run_hook(env, "vm0", "release", "end", xml))
    assert list(devices(short_dir)) == ["vm0"], "another socket's device is not removed"


def test_a_domain_name_that_is_no_device_name_is_refused(short_dir: Path) -> None:
    start_daemon(short_dir)
    xml = example(f"{short_dir}/x.sock")
    result = run_hook(hook_env(short_dir), "my vm", "prepare", "begin", xml)
    assert result.returncode == 1
    assert result.stderr.startswith("balloond hook: my vm: bad device name 'my vm'")
    assert result.stderr.count("\n") == 1
    assert devices(short_dir) == {}


def test_a_domain_without_balloond_is_ignored(short_dir: Path) -> None:
    env = hook_env(short_dir, tripwire(short_dir))
    plain = without_balloond(example(f"{short_dir}/vm0.sock"))
    other_vhost_user = example(f"{short_dir}/vm0.sock").replace(
        "&quot;virtio-id&quot;:5", "&quot;virtio-id&quot;:26"
    )
    for xml in (plain, other_vhost_user, ""):
        for operation, sub in [("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                               ("migrate", "begin"), ("reconnect", "begin"),
                               ("stopped", "end"), ("release", "end")]:  # fmt: skip
            assert quiet_success(run_hook(env, "plain", operation, sub, xml)), (operation, xml)
    assert not (short_dir / "called").exists(), "balloond was called for a plain domain"

    # The tripwire does go off for a balloond domain.
    result = run_hook(env, "vm0", "prepare", "begin", example(f"{short_dir}/vm0.sock"))
    assert result.returncode == 1 and result.stderr == "balloond hook: vm0: tripwire\n"
    assert (short_dir / "called").read_text().startswith("status --json --control ")


def test_prepare_without_a_daemon_fails_with_one_line(short_dir: Path) -> None:
    env = hook_env(short_dir)
    xml = example(f"{short_dir}/vm0.sock")
    result = run_hook(env, "vm0", "prepare", "begin", xml)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"balloond hook: vm0: no balloond is running at {short_dir}/control.sock"
    )
    # Released without a daemon: there is no device left to remove.
    assert quiet_success(run_hook(env, "vm0", "release", "end", xml))


def test_a_daemon_that_does_not_answer_cannot_hang_the_hook(short_dir: Path) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(short_dir / "control.sock"))
    stuck.listen(8)  # accepts connections, never answers
    try:
        env = hook_env(short_dir, BALLOOND_HOOK_TIMEOUT="1")
        started = time.monotonic()
        result = run_hook(env, "vm0", "prepare", "begin", example(f"{short_dir}/vm0.sock"))
        assert time.monotonic() - started < 10
        assert result.returncode == 1
        assert result.stderr == "balloond hook: vm0: 'balloond status' did not finish within 1 s\n"
    finally:
        stuck.close()


def test_a_missing_balloond_command_is_named(short_dir: Path) -> None:
    env = hook_env(short_dir, short_dir / "nowhere" / "balloond")
    result = run_hook(env, "vm0", "prepare", "begin", example(f"{short_dir}/vm0.sock"))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"balloond hook: vm0: cannot run {short_dir}/nowhere/balloond: No such file or directory"
    )
    assert result.stderr.count("\n") == 1
