"""Fakes for the libvirt driver's unit tests: libvirt, qemu-img, the target host, the copier.

Only the parts a daemon cannot be made to do on demand are faked. The
target host is a real directory, and its file operations are the real
remote-fs implementation (``transfer.remotefs.do``) run on it; copies
really write the destination file there (or a partial file, then fail).
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from typing import Any, Callable

import libvirt

from driver.errors import ImageError
from transfer import remotefs
from transfer.endpoint import Endpoint
from transfer.errors import TransferError
from transfer.options import CopyOptions
from transfer.progress import Progress
from transfer.remotefs import RemoteFS
from transfer.result import CopyResult
from transfer.target import PART_SUFFIX

GiB = 1 << 30
ACTIVE = {libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED,
          libvirt.VIR_DOMAIN_SHUTDOWN, libvirt.VIR_DOMAIN_PMSUSPENDED}


def libvirt_error(message: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> libvirt.libvirtError:
    """A real libvirtError carrying ``code`` the way libvirt fills it (the ``err`` tuple)."""
    e = libvirt.libvirtError(message)
    e.err = (code, libvirt.VIR_FROM_QEMU, message, libvirt.VIR_ERR_ERROR, "", None, None, -1, -1)
    return e


def _raise_if(fail: dict[str, libvirt.libvirtError], op: str) -> None:
    if op in fail:
        raise fail[op]


class FakeClock:
    """A monotonic clock that only moves when something sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeDomain:
    """The virDomain methods the driver uses.

    ``shutdown_takes``: seconds after the first ACPI signal until the guest
    is off, or None for a guest that ignores ACPI. ``start_state``: the state
    ``create`` leaves it in. ``fail``: method name -> libvirtError to raise
    (``state`` and ``XMLDesc`` too, without recording a call); ``vanish``
    undefines it behind the driver's back.
    """

    def __init__(self, uuid: str, name: str, xml: str, state: int = libvirt.VIR_DOMAIN_SHUTOFF,
                 clock: FakeClock | None = None) -> None:
        self.uuid = uuid
        self._name = name
        self.xml = xml
        self._state = state
        self.clock = clock or FakeClock()
        self.shutdown_takes: float | None = 0.0
        self.start_state = libvirt.VIR_DOMAIN_RUNNING
        self.fail: dict[str, libvirt.libvirtError] = {}
        self.state_after_failed_destroy: int | None = None
        self.calls: list[str] = []
        self.shutdown_times: list[float] = []
        self.xml_flags: list[int] = []
        self.conn: FakeConn | None = None
        self._off_at: float | None = None

    def _settle(self) -> None:
        if self._off_at is not None and self.clock() >= self._off_at and self._state in ACTIVE:
            self._state = libvirt.VIR_DOMAIN_SHUTOFF
            self._off_at = None

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.fail:
            raise self.fail[op]

    def vanish(self) -> None:
        """Undefine the domain behind the driver's back: reads of it fail with VIR_ERR_NO_DOMAIN."""
        gone = libvirt_error(f"Domain not found: no domain with matching uuid '{self.uuid}'",
                             libvirt.VIR_ERR_NO_DOMAIN)
        self.fail.update(state=gone, XMLDesc=gone)
        if self.conn is not None:
            self.conn.domains.pop(self.uuid, None)

    def state(self, flags: int = 0) -> list[int]:
        _raise_if(self.fail, "state")
        self._settle()
        return [self._state, 1]

    def isActive(self) -> int:
        self._settle()
        return int(self._state in ACTIVE)

    def create(self) -> int:
        self._maybe_fail("create")
        if self.isActive():
            raise libvirt_error("Requested operation is not valid: domain is already running",
                                libvirt.VIR_ERR_OPERATION_INVALID)
        self._state = self.start_state
        return 0

    def destroy(self) -> int:
        if "destroy" in self.fail and self.state_after_failed_destroy is not None:
            self._state = self.state_after_failed_destroy
        self._maybe_fail("destroy")
        if not self.isActive():
            raise libvirt_error("Requested operation is not valid: domain is not running",
                                libvirt.VIR_ERR_OPERATION_INVALID)
        self._state = libvirt.VIR_DOMAIN_SHUTOFF
        self._off_at = None
        return 0

    def shutdown(self) -> int:
        self._maybe_fail("shutdown")
        if not self.isActive():
            raise libvirt_error("Requested operation is not valid: domain is not running",
                                libvirt.VIR_ERR_OPERATION_INVALID)
        self.shutdown_times.append(self.clock())
        if self.shutdown_takes is not None and self._off_at is None:
            self._off_at = self.clock() + self.shutdown_takes
        return 0

    def undefine(self) -> int:
        self._maybe_fail("undefine")
        if self.conn is not None:
            self.conn.domains.pop(self.uuid, None)
        return 0

    def XMLDesc(self, flags: int = 0) -> str:
        _raise_if(self.fail, "XMLDesc")
        self.xml_flags.append(flags)
        return self.xml

    def UUIDString(self) -> str:
        return self.uuid

    def name(self) -> str:
        return self._name


class FakeConn:
    """The virConnect methods the driver uses. ``fail``: method name (listAllDomains, getInfo,
    getCapabilities, getVersion) -> libvirtError to raise. ``listed``: domains listAllDomains
    answers besides the defined ones (gone meanwhile, say)."""

    def __init__(self, *domains: FakeDomain, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.domains: dict[str, FakeDomain] = {}
        for d in domains:
            self.add(d)
        self.alive = True
        self.lookup_error: libvirt.libvirtError | None = None
        self.define_error: libvirt.libvirtError | None = None
        self.defined: list[str] = []
        self.info = ["x86_64", 15872, 8, 2400, 1, 1, 4, 2]
        self.capabilities = ("<capabilities><host><uuid>0</uuid><cpu><arch>aarch64</arch></cpu></host>"
                             "</capabilities>")
        self.version = 8_000_000
        self.fail: dict[str, libvirt.libvirtError] = {}
        self.listed: list[FakeDomain] = []

    def add(self, dom: FakeDomain) -> FakeDomain:
        dom.conn = self
        self.domains[dom.uuid] = dom
        return dom

    def isAlive(self) -> int:
        return int(self.alive)

    def lookupByUUIDString(self, uuid: str) -> FakeDomain:
        if self.lookup_error is not None:
            raise self.lookup_error
        if uuid not in self.domains:
            raise libvirt_error(f"Domain not found: no domain with matching uuid '{uuid}'",
                                libvirt.VIR_ERR_NO_DOMAIN)
        return self.domains[uuid]

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        _raise_if(self.fail, "listAllDomains")
        return [*self.listed, *self.domains.values()]

    def defineXML(self, xml: str) -> FakeDomain:
        self.defined.append(xml)
        if self.define_error is not None:
            raise self.define_error
        root = ET.fromstring(xml)
        uuid, name = root.findtext("uuid") or "", root.findtext("name") or ""
        dom = self.domains.get(uuid)
        if dom is None:
            dom = self.add(FakeDomain(uuid, name, xml, clock=self.clock))
        dom.xml = xml
        return dom

    def getInfo(self) -> list[Any]:
        _raise_if(self.fail, "getInfo")
        return list(self.info)

    def getCapabilities(self) -> str:
        _raise_if(self.fail, "getCapabilities")
        return self.capabilities

    def getVersion(self) -> int:
        _raise_if(self.fail, "getVersion")
        return self.version


class FakeQemuImg:
    """qemu-img as a runner: ``info`` answers JSON for files that exist, other calls are recorded.

    Images not registered with ``add`` are raw, sized as the file is.
    ``convert`` writes its output file (the source's bytes).
    """

    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}
        self.calls: list[list[str]] = []
        self.fail: dict[str, ImageError] = {}

    def add(self, path: str, fmt: str = "raw", virtual_size: int = GiB, actual_size: int | None = None,
            backing: str = "", backing_format: str = "") -> None:
        info: dict[str, Any] = {"filename": path, "format": fmt, "virtual-size": virtual_size}
        if actual_size is not None:
            info["actual-size"] = actual_size
        if backing:
            info["backing-filename"] = os.path.basename(backing)
            info["full-backing-filename"] = backing
            info["backing-filename-format"] = backing_format or "qcow2"
        self.images[path] = info

    def commands(self, sub: str) -> list[list[str]]:
        return [c for c in self.calls if c[1] == sub]

    def __call__(self, argv: list[str] | tuple[str, ...]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        sub = argv[1]
        if sub in self.fail:
            raise self.fail[sub]
        if sub == "info":
            path = argv[-1]
            if not os.path.exists(path):
                raise ImageError(path=path, reason=f"Could not open '{path}': No such file or directory")
            info = dict(self.images.get(path) or {"filename": path, "format": "raw",
                                                  "virtual-size": os.path.getsize(path)})
            info.setdefault("actual-size", os.stat(path).st_blocks * 512)
            return json.dumps(info)
        if sub == "convert":
            src, out = argv[-2], argv[-1]
            shutil.copyfile(src, out)
            with open(out, "ab") as f:
                f.write(b"+flattened")
        return ""


class FakeTarget:
    """The destination host: a real directory and the remote-fs sessions opened on it.

    ``free``: what ``free`` answers (None: the real free space of the
    directory). ``fail``: op or (op, name) -> TransferError raised by it.
    ``fail_sessions``: an error raised when a session is opened.
    """

    def __init__(self, root: str, free: int | None = None) -> None:
        self.root = root
        self.free = free
        self.fail: dict[str | tuple[str, str], TransferError] = {}
        self.fail_sessions: TransferError | None = None
        self.calls: list[tuple[str, str | None]] = []
        self.sessions: list[tuple[Endpoint, str]] = []
        self.closed = 0

    def remote_fs(self, ep: Endpoint, root: str) -> "FakeRemoteFS":
        """The driver's ``remote_fs`` factory."""
        self.sessions.append((ep, root))
        if self.fail_sessions is not None:
            raise self.fail_sessions
        return FakeRemoteFS(self, ep, root)

    def ops(self, op: str) -> list[str | None]:
        return [name for o, name in self.calls if o == op]


class FakeRemoteFS(RemoteFS):
    """The real RemoteFS surface; its operations run on the target directory instead of over SSH."""

    def __init__(self, target: FakeTarget, ep: Endpoint, root: str) -> None:
        super().__init__(ep, root)
        self.target = target

    def _call(self, op: str, **args: Any) -> Any:
        self.target.calls.append((op, args.get("name")))
        for key in (op, (op, args.get("name"))):
            if key in self.target.fail:
                raise self.target.fail[key]
        if op == "free" and self.target.free is not None:
            return self.target.free
        try:
            return remotefs.do({"op": op, "root": self.target.root, **args})
        except OSError as e:
            raise TransferError(reason=f"{op} {args.get('name', '')!r}: {e.strerror or e}") from None

    def close(self) -> None:
        self.target.closed += 1
        super().close()


class FakeCopier:
    """transfer.copy: write ``ep.path`` (a path under ``instances_path``) into the target.

    ``fail_on``: base name of a source whose copy fails after writing a
    partial file where the real copier keeps one.
    """

    def __init__(self, instances_path: str, target: FakeTarget) -> None:
        self.instances_path = instances_path
        self.target = target
        self.calls: list[tuple[str, str, Endpoint, dict[str, Any]]] = []
        self.fail_on: str | None = None
        self.error: BaseException = TransferError(reason="connection reset by peer")
        self.seen: dict[str, bytes] = {}

    def dest_file(self, ep_path: str) -> str:
        return os.path.join(self.target.root, os.path.relpath(ep_path, self.instances_path))

    def copy(self, src: str, ep: Endpoint, options: CopyOptions, **kw: Any) -> CopyResult:
        """transfer.copy: the method is the options' (recorded with the options among the keywords)."""
        return self._copy(options.method, src, ep, {"options": options, **kw})

    def sources(self) -> list[str]:
        return [src for _m, src, _ep, _kw in self.calls]

    def _copy(self, method: str, src: str, ep: Endpoint, kw: dict[str, Any]) -> CopyResult:
        self.calls.append((method, src, ep, kw))
        with open(src, "rb") as f:
            data = f.read()
        self.seen[src] = data
        dst = self.dest_file(ep.path)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        progress: Callable[[Progress], None] | None = kw.get("progress")
        if progress:
            progress(Progress(len(data) // 2, len(data), 1.0, 1.0))
        if self.fail_on and os.path.basename(src) == self.fail_on:
            d, base = os.path.split(dst)
            partial = (os.path.join(d, ".rsync-partial", base) if method == "rsync"
                       else os.path.join(d, f".{base}{PART_SUFFIX}"))
            os.makedirs(os.path.dirname(partial), exist_ok=True)
            with open(partial, "wb") as f:
                f.write(data[: len(data) // 2])
            raise self.error
        with open(dst, "wb") as f:
            f.write(data)
        return CopyResult(method, len(data), len(data), len(data), 0, 0, 0.5, f"digest-of-{os.path.basename(src)}")


def domain_xml(uuid: str, inst_dir: str, disks: list[tuple[str, str, str]] | None = None,
               memory_kib: int = 1048576, vcpus: int = 1, flavor: dict[str, Any] | None = None,
               bridges: list[tuple[str, str]] | None = None, name: str = "vm1") -> str:
    """A domain as libvirt would hand it out: ``disks`` are (file name, format, target dev)."""
    disks = [("disk", "qcow2", "vda")] if disks is None else disks
    disk_xml = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{os.path.join(inst_dir, fname) if not fname.startswith('/') else fname}'/>"
        f"<target dev='{dev}' bus='virtio'/></disk>" for fname, fmt, dev in disks)
    iface_xml = "".join(f"<interface type='bridge'><mac address='{mac}'/><source bridge='{br}'/>"
                        f"<model type='virtio'/></interface>" for mac, br in (bridges or []))
    meta = ""
    if flavor is not None:
        attrs = " ".join(f'{k}="{v}"' for k, v in flavor.items())
        meta = (f'<metadata><cf:flavor xmlns:cf="https://coldferry.invalid/xmlns/instance/1" {attrs}/>'
                f"</metadata>")
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>{meta}"
            f"<memory unit='KiB'>{memory_kib}</memory><currentMemory unit='KiB'>{memory_kib}</currentMemory>"
            f"<vcpu placement='static'>{vcpus}</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices>{disk_xml}"
            f"<disk type='file' device='cdrom'><driver name='qemu' type='raw'/>"
            f"<source file='/srv/iso/seed.iso'/><target dev='sda' bus='sata'/><readonly/></disk>"
            f"{iface_xml}"
            f"<serial type='file'><source path='{inst_dir}/console.log'/><target port='0'/></serial>"
            f"</devices></domain>")
