"""The coldferry test guest: build it, describe it to libvirt, boot it under
qemu directly, read what it says on its serial console and what it wrote on
its disk.

The guest is a Debian cloud kernel with a busybox initramfs built by
``scripts/make-test-guest``.  Its /init keeps a record log on its first
virtio disk (/dev/vda); the kernel command line picks what it does
(``cfguest.mode=write|check|writeloop|probe``, ``cfguest.interval=SECS``,
``cfguest.stride=BYTES``).

Disk protocol (byte offsets; the script's header comment is the reference):

- header at 0, one 512-byte sector: ``CFGUEST1 count=<N> stride=<S>\\n``,
  zero-padded; an all-zero sector is an empty log;
- record ``i`` (``0 <= i < N``) at ``LOG_START + i*S``, ``RECORD_SIZE``
  bytes: a 512-byte sector ``CFREC1 seq=<i> boot=<boot id> sha256=<hex>\\n``
  (zero-padded), then ``PAYLOAD_SIZE`` random bytes whose sha256 that is;
- a record is written and synced before the header counts it, so ``N``
  never covers a torn record; nothing outside the header and the record
  slots is ever written by the guest.

Console lines start with ``CFGUEST ``: ``boot <id>``, ``verify ok <N>``,
``verify FAIL <index|header> <reason>``, ``wrote <i>`` (printed only after
the record and header are synced), ``full <i>``, ``ready``, ``poweroff``,
``probe ok``, ``error <what>``.  The ACPI power button (``virsh shutdown``,
QMP ``system_powerdown``) makes the guest stop between records, sync, print
``poweroff`` and power off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "make-test-guest"
DEFAULT_DIR = Path(os.environ.get("COLDFERRY_TEST_GUEST_DIR", "/var/cache/coldferry/test-guest"))
QEMU = "qemu-system-x86_64"

PREFIX = "CFGUEST "
SECTOR = 512
LOG_START = 1 << 20
RECORD_SIZE = 4096
PAYLOAD_SIZE = RECORD_SIZE - SECTOR
DEFAULT_STRIDE = 1 << 20
HEADER_MAGIC = "CFGUEST1"
RECORD_MAGIC = "CFREC1"
MODES = ("write", "check", "writeloop", "probe")


class GuestError(Exception):
    """Something about the test guest went wrong; the message says what."""


class GuestTimeout(GuestError):
    """A bounded wait ran out."""


@dataclass(frozen=True)
class GuestImage:
    """The built guest: kernel, initramfs and the kernel's version string."""

    kernel: Path
    initrd: Path
    version: str


@dataclass(frozen=True)
class Record:
    """One record slot as read from the disk by the host.

    ``ok`` is true when the slot holds record ``index`` and its payload
    matches the stored sha256; ``seq``, ``boot_id`` and ``sha256`` are None
    when the slot holds no record at all.
    """

    index: int
    offset: int
    seq: int | None
    boot_id: str | None
    sha256: str | None
    ok: bool


def ensure_built(out_dir: Path = DEFAULT_DIR, timeout: float = 900.0) -> GuestImage:
    """The guest in ``out_dir``, running ``scripts/make-test-guest`` first if
    an output is missing or older than the script.

    Raises GuestError if the script fails.
    """
    out_dir = Path(out_dir)
    files = [out_dir / name for name in ("vmlinuz", "initrd.img", "VERSION")]
    script_mtime = BUILD_SCRIPT.stat().st_mtime
    if not all(f.exists() and f.stat().st_mtime > script_mtime for f in files):
        result = subprocess.run([str(BUILD_SCRIPT), "--out", str(out_dir)], capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise GuestError(f"{BUILD_SCRIPT} --out {out_dir} failed (exit {result.returncode}): "
                             f"{result.stderr.strip()}")
    fields = dict(line.split("=", 1) for line in files[2].read_text().splitlines() if "=" in line)
    return GuestImage(kernel=files[0], initrd=files[1], version=fields.get("kernel", "unknown"))


def kernel_cmdline(mode: str = "write", *, interval: float | None = None, stride: int | None = None,
                   extra: str = "") -> str:
    """The kernel command line for ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise GuestError(f"unknown guest mode {mode!r}: use one of {', '.join(MODES)}")
    if stride is not None and (stride < RECORD_SIZE or stride % RECORD_SIZE):
        raise GuestError(f"stride {stride} must be a multiple of {RECORD_SIZE} bytes")
    args = ["console=ttyS0", f"cfguest.mode={mode}"]
    if interval is not None:
        args.append(f"cfguest.interval={interval:g}")
    if stride is not None:
        args.append(f"cfguest.stride={stride}")
    return " ".join(args + extra.split())


def domain_xml(name: str, disk: Path | str, serial_log: Path | str, image: GuestImage, *,
               uuid: str | None = None, domain_type: str = "qemu", disk_format: str = "raw",
               mode: str = "write", interval: float | None = None, stride: int | None = None,
               bridge: str | None = None, mac: str | None = None, memory_mib: int = 128,
               vcpus: int = 1) -> str:
    """Libvirt domain XML for the guest: direct kernel boot, one virtio disk,
    the serial console into the file ``serial_log`` (truncated at each
    start), ACPI on (so ``virsh shutdown`` works), no network unless
    ``bridge`` names a bridge for one virtio interface.

    ``domain_type`` is ``kvm`` or ``qemu`` (see detect_domain_type).
    """
    if domain_type not in ("kvm", "qemu"):
        raise GuestError(f"domain type {domain_type!r}: use 'kvm' or 'qemu'")
    if disk_format not in ("raw", "qcow2"):
        raise GuestError(f"disk format {disk_format!r}: use 'raw' or 'qcow2'")
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = uuid or str(uuidlib.uuid4())
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = str(vcpus)
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="q35").text = "hvm"
    ET.SubElement(os_, "kernel").text = str(image.kernel)
    ET.SubElement(os_, "initrd").text = str(image.initrd)
    ET.SubElement(os_, "cmdline").text = kernel_cmdline(mode, interval=interval, stride=stride)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(dom, event).text = action
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type=disk_format)
    ET.SubElement(disk_el, "source", file=str(disk))
    ET.SubElement(disk_el, "target", dev="vda", bus="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(serial_log))
    ET.SubElement(serial, "target", port="0")
    if bridge:
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=bridge)
        if mac:
            ET.SubElement(nic, "mac", address=mac)
        ET.SubElement(nic, "model", type="virtio")
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def make_disk(path: Path | str, size: int, fmt: str = "raw") -> Path:
    """Create an empty (sparse) disk image of ``size`` bytes; refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise GuestError(f"{path} exists; remove it first or choose another path")
    if fmt == "raw":
        with open(path, "xb") as f:
            f.truncate(size)
    elif fmt == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    else:
        raise GuestError(f"disk format {fmt!r}: use 'raw' or 'qcow2'")
    return path


def console_lines(log_path: Path | str, since: int = 0) -> list[str]:
    """The guest's own complete lines in the serial log from byte ``since``
    on, prefix stripped: ``["boot …", "verify ok 1", "wrote 1", "ready"]``."""
    return [line[len(PREFIX):] for line in _complete_lines(Path(log_path), since)
            if line.startswith(PREFIX)]


def wait_for(log_path: Path | str, pattern: str | re.Pattern[str], timeout: float, *, since: int = 0,
             proc: subprocess.Popen | None = None, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> str:
    """The first complete line of the serial log (from byte ``since``) in
    which ``pattern`` is found, polling until ``timeout`` seconds pass.

    Raises GuestTimeout with the log's tail when no line matches in time, or
    GuestError at once if ``proc`` (the hypervisor) has exited.
    """
    regex = re.compile(pattern)
    deadline = clock() + timeout
    log_path = Path(log_path)
    while True:
        for line in _complete_lines(log_path, since):
            if regex.search(line):
                return line
        if proc is not None and proc.poll() is not None:
            raise GuestError(f"qemu exited ({proc.returncode}) before {regex.pattern!r} appeared in "
                             f"{log_path}; its tail:\n{_tail(log_path)}")
        if clock() >= deadline:
            raise GuestTimeout(f"no line matching {regex.pattern!r} in {log_path} within {timeout:g} s; "
                               f"its tail:\n{_tail(log_path)}")
        sleep(0.1)


def _complete_lines(path: Path, since: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(since)
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").replace("\r", "")
    return text.split("\n")[:-1]


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(_complete_lines(path, 0)[-lines:])


def records_on_disk(disk: Path | str | bytes) -> list[Record]:
    """The guest's record log, read from the host: ``disk`` is a raw or
    qcow2 image (format detected) or the raw bytes of one.

    An all-zero header is an empty log.  Raises GuestError when the header
    is not a CFGUEST1 header.
    """
    if isinstance(disk, bytes):
        return _parse_log(lambda off, n: disk[off:off + n])
    path = Path(disk)
    with open(path, "rb") as f:
        is_qcow2 = f.read(4) == b"QFI\xfb"
    if not is_qcow2:
        with open(path, "rb") as f:
            return _parse_log(lambda off, n: os.pread(f.fileno(), n, off))
    with tempfile.TemporaryDirectory(prefix="cfguest-") as tmp:
        raw = Path(tmp) / "disk.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
        return records_on_disk(raw)


def _parse_log(read: Callable[[int, int], bytes]) -> list[Record]:
    header = read(0, SECTOR)
    if not header.strip(b"\0"):
        return []
    fields = _fields(header)
    try:
        if fields[0] != HEADER_MAGIC:
            raise ValueError(fields[0])
        count = int(fields[1].removeprefix("count="))
        stride = int(fields[2].removeprefix("stride="))
    except (IndexError, ValueError):
        raise GuestError(f"no {HEADER_MAGIC} record-log header on the disk: {header[:80]!r}") from None
    return [_parse_record(i, LOG_START + i * stride, read(LOG_START + i * stride, RECORD_SIZE))
            for i in range(count)]


def _parse_record(index: int, offset: int, data: bytes) -> Record:
    fields = _fields(data[:SECTOR])
    if len(fields) < 4 or fields[0] != RECORD_MAGIC:
        return Record(index, offset, None, None, None, False)
    seq = int(fields[1].removeprefix("seq=")) if fields[1].removeprefix("seq=").isdigit() else None
    boot_id = fields[2].removeprefix("boot=")
    sha = fields[3].removeprefix("sha256=")
    ok = seq == index and hashlib.sha256(data[SECTOR:RECORD_SIZE]).hexdigest() == sha
    return Record(index, offset, seq, boot_id, sha, ok)


def _fields(sector: bytes) -> list[str]:
    return sector.split(b"\n", 1)[0].rstrip(b"\0").decode("ascii", errors="replace").split()


@dataclass
class QemuGuest:
    """The guest running in a qemu-system-x86_64 started by start_qemu();
    use it as a context manager so qemu is killed (by pid) whatever happens."""

    proc: subprocess.Popen
    serial_log: Path
    qmp_socket: Path

    def __enter__(self) -> "QemuGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def wait_for(self, pattern: str, timeout: float, since: int = 0) -> str:
        """wait_for() on this guest's serial log, failing early if qemu exits."""
        return wait_for(self.serial_log, pattern, timeout, since=since, proc=self.proc)

    def powerdown(self, timeout: float = 5.0) -> None:
        """Press the ACPI power button (QMP system_powerdown)."""
        qmp(self.qmp_socket, "system_powerdown", timeout=timeout)

    def wait_exit(self, timeout: float) -> int:
        """qemu's exit status once it exits by itself; GuestTimeout if it does not in time."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"qemu (pid {self.proc.pid}) still running {timeout:g} s after it was "
                               f"expected to exit; serial log tail:\n{_tail(self.serial_log)}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_qemu(image: GuestImage, workdir: Path | str, disk: Path | str | None = None, *,
               disk_format: str = "raw", accel: str = "tcg", mode: str = "write",
               interval: float | None = None, stride: int | None = None, name: str = "guest",
               qemu: str = QEMU) -> QemuGuest:
    """Boot the guest in qemu directly (no libvirt): serial log
    ``workdir/<name>.log`` (truncated), QMP socket ``workdir/<name>.qmp``.

    ``accel`` is ``tcg`` or ``kvm``; ``disk`` may be None (for mode probe).
    """
    workdir = Path(workdir)
    serial_log = workdir / f"{name}.log"
    qmp_socket = workdir / f"{name}.qmp"
    if len(str(qmp_socket)) > 100:
        raise GuestError(f"QMP socket path {qmp_socket} is too long for a Unix socket; use a shorter workdir")
    serial_log.unlink(missing_ok=True)
    qmp_socket.unlink(missing_ok=True)
    cmd = [qemu, "-machine", f"q35,accel={accel}", "-m", "128", "-smp", "1", "-nodefaults",
           "-display", "none", "-no-reboot",
           "-kernel", str(image.kernel), "-initrd", str(image.initrd),
           "-append", kernel_cmdline(mode, interval=interval, stride=stride),
           "-chardev", f"file,id=serial0,path={_escape(serial_log)}", "-serial", "chardev:serial0",
           "-qmp", f"unix:{_escape(qmp_socket)},server=on,wait=off"]
    if disk is not None:
        cmd += ["-drive", f"file={_escape(disk)},if=virtio,format={disk_format}"]
    with open(workdir / f"{name}.stderr", "wb") as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    return QemuGuest(proc, serial_log, qmp_socket)


def _escape(path: Path | str) -> str:
    """A path as one value of a qemu -option (commas doubled)."""
    return str(path).replace(",", ",,")


def qmp(socket_path: Path | str, command: str, timeout: float = 5.0) -> dict:
    """Run one QMP ``command`` (no arguments) on the monitor at ``socket_path``; its return value."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        while True:  # qemu creates the socket a moment after it starts
            try:
                sock.connect(str(socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    raise GuestTimeout(f"no QMP monitor at {socket_path} within {timeout:g} s") from None
                time.sleep(0.1)
        stream = sock.makefile("rwb")
        json.loads(stream.readline())  # greeting
        reply: dict = {}
        for execute in ("qmp_capabilities", command):
            stream.write(json.dumps({"execute": execute}).encode() + b"\n")
            stream.flush()
            while True:
                reply = json.loads(stream.readline())
                if "error" in reply:
                    raise GuestError(f"QMP {execute} failed: {reply['error']}")
                if "return" in reply:
                    break  # anything else is an asynchronous event
        return reply["return"]


@functools.cache
def detect_domain_type(image: GuestImage | None = None, timeout: float = 15.0) -> str:
    """``kvm`` if this guest boots under KVM here, else ``qemu`` (TCG).

    ``$COLDFERRY_DOMAIN_TYPE`` (kvm or qemu) overrides.  Without read-write
    access to /dev/kvm the answer is ``qemu``; with it, the guest is booted
    once with accel=kvm in probe mode and must print ``probe ok`` within
    ``timeout`` seconds (nested KVM can be slower than TCG).  Cached per process,
    and on disk beside the image for this kernel, qemu and CPU, so the probe runs
    once per machine rather than once per test run.
    """
    forced = os.environ.get("COLDFERRY_DOMAIN_TYPE")
    if forced:
        if forced not in ("kvm", "qemu"):
            raise GuestError(f"COLDFERRY_DOMAIN_TYPE={forced!r}: use 'kvm' or 'qemu'")
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "qemu"
    image = image or ensure_built()
    cache = image.kernel.parent / "domain-type.json"
    key = _probe_key(image)
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key and cached.get("type") in ("kvm", "qemu"):
            return cached["type"]
    except (OSError, ValueError):
        pass
    found = "kvm"
    with tempfile.TemporaryDirectory(prefix="cfprobe-") as tmp:
        with start_qemu(image, tmp, accel="kvm", mode="probe", name="probe") as guest:
            try:
                guest.wait_for(rf"^{PREFIX}probe ok", timeout)
            except GuestError:
                found = "qemu"
    cache.write_text(json.dumps({"key": key, "type": found}))
    return found


def _probe_key(image: GuestImage) -> str:
    """What the probe's answer depends on: guest kernel, host kernel, qemu, CPU."""
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    return hashlib.sha256("|".join([image.version, os.uname().release, qemu, cpu]).encode()).hexdigest()
