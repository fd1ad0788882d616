"""Two network namespaces joined by a veth pair: two "hosts" with no loopback between them.

``TwoHosts()`` creates ``emt<pid>a`` and ``emt<pid>b`` (addresses 10.201.<n>.1 and .2, only
inside them), and removes them (the veth goes with them) on ``close()``. A process enters one
with :func:`enter` before it opens any socket; a thread enters one for itself (``setns``
changes the calling thread only), which is how the test's own fault proxy sits in host A.
Needs root and iproute2; :func:`unavailable` says why not, else None.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import subprocess

CLONE_NEWNET, CLONE_NEWNS = 0x40000000, 0x00020000
MS_REC, MS_PRIVATE, MNT_DETACH = 0x4000, 1 << 18, 2
_serial = itertools.count(1)


def unavailable() -> str | None:
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    probe = f"emtprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)


def enter(name: str, *, process: bool = True) -> None:
    """Move the calling thread into namespace ``name``. ``process``: the caller is a fresh,
    single-threaded process, which also gets its own view of ``/sys`` (as ``ip netns exec``
    gives): engines that list network devices there (UCX) must see this namespace's."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        check(libc.setns(fd, CLONE_NEWNET), f"setns({name})")
    finally:
        os.close(fd)
    if process:
        check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        check(libc.umount2(b"/sys", MNT_DETACH), "umount /sys")
        check(libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs")


class TwoHosts:
    def __init__(self) -> None:
        n = next(_serial)
        tag = f"{os.getpid() % 100000}{n}"
        self.a, self.b = f"emt{tag}a", f"emt{tag}b"
        net = 10 + (os.getpid() + n) % 200
        self.addr_a, self.addr_b = f"10.201.{net}.1", f"10.201.{net}.2"
        veth_a, veth_b = f"ve{tag}a", f"ve{tag}b"
        try:
            _ip("netns", "add", self.a)
            _ip("netns", "add", self.b)
            _ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
            _ip("link", "set", veth_a, "netns", self.a)
            _ip("link", "set", veth_b, "netns", self.b)
            for ns, dev, addr in ((self.a, veth_a, self.addr_a), (self.b, veth_b, self.addr_b)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
