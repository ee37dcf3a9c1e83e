"""``coldferry copy``, ``coldferry checksum`` and ``coldferry receive``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import transfer
from transfer.digest import DEFAULT_CHUNK
from transfer.endpoint import DEFAULT_REMOTE_COMMAND, Endpoint
from transfer.errors import TransferError
from transfer.options import CHANNELS, COMPRESS_MODES, DEFAULT_STREAMS, METHODS, CopyOptions
from transfer.source import Source
from transfer.units import parse_size

from coldferry.progress_bar import progress_bar

COPY_HELP = """\
Copy one disk image to another host.

The stream method (default) reads only allocated, non-zero data, sends it in
checksummed chunks over several parallel streams and resumes an interrupted
copy where it stopped; the target stays sparse. It logs in over SSH, starts
'coldferry receive' on the remote host and then sends the data over a
direct TCP connection on which every frame is sealed with AES-128-GCM under
a one-time key handed over through SSH (--channel direct, the default and
fastest), over a direct TLS connection (--channel tls) or inside the SSH
connection (--channel ssh, for when only port 22 is open).

The rsync method runs rsync over OpenSSH with --sparse, keeps partial files
for resuming, and checks the result's image digest on both ends.

Host keys are always verified against --known-hosts; unknown keys are
refused, never added.

examples:
  coldferry copy disk.qcow2 root@host2:/var/lib/coldferry/instances/vm1/disk.qcow2
  coldferry copy --method rsync --bwlimit 100M disk.raw host2:/srv/images/disk.raw
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("copy", help="copy a disk image to another host over SSH",
                       description=COPY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="local file to copy")
    p.add_argument("dest", metavar="[USER@]HOST:DEST", help="destination file on the remote host")
    p.add_argument("--method", choices=METHODS, default="stream",
                   help="copier to use (default: %(default)s)")
    p.add_argument("--streams", type=int, default=DEFAULT_STREAMS, metavar="N",
                   help="parallel data streams, stream method only (default: %(default)s)")
    p.add_argument("--channel", choices=CHANNELS, default="direct",
                   help="where stream data flows: a direct TCP connection opened for this copy with "
                        "AES-GCM sealed frames, a direct TLS connection, or inside the SSH connection "
                        "(default: %(default)s)")
    p.add_argument("--compress", choices=COMPRESS_MODES, default="off",
                   help="per-chunk compression, stream method only: fast = zstd level 1 on every "
                        "chunk; auto = keep it only where it saves at least 10%% and back off on "
                        "incompressible data (default: %(default)s)")
    p.add_argument("--bwlimit", metavar="RATE", help="bandwidth limit in bytes/s, e.g. 50M or 1G")
    p.add_argument("--ssh-port", type=int, default=22, metavar="P", help="SSH port (default: 22)")
    p.add_argument("--identity", metavar="FILE", help="SSH private key (default: ssh-agent and ~/.ssh)")
    p.add_argument("--known-hosts", metavar="FILE", default=os.path.expanduser("~/.ssh/known_hosts"),
                   help="known_hosts file to verify the host key against (default: %(default)s)")
    p.add_argument("--remote-command", metavar="CMD", default=shlex.join(DEFAULT_REMOTE_COMMAND),
                   help="command that starts the receiver on the remote host (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination file instead of refusing")
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming an interrupted copy of the same source")
    p.add_argument("--fsync", action="store_true",
                   help="flush the copy to disk on the receiving host before reporting success")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(func=run_copy)

    c = sub.add_parser("checksum", help="print the image digest of local files",
                       description="Print each file's image digest, the value 'copy' compares on "
                                   "both ends. A file and any sparse copy of it have the same digest.")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.set_defaults(func=run_checksum)

    r = sub.add_parser("receive", help="receiving end of a stream copy (started over SSH)",
                       description="Receive one stream copy. Started by 'coldferry copy' over SSH; "
                                   "reads its instructions as JSON lines on standard input.")
    r.set_defaults(func=run_receive)

    f = sub.add_parser("remote-fs", help="file operations for a driver on another host (over SSH)",
                       description="Carry out file operations confined to one directory, read as "
                                   "JSON lines on standard input. Started over SSH by the driver.")
    f.set_defaults(func=run_remote_fs)


def run_copy(args: argparse.Namespace) -> int:
    try:
        options = copy_options(args)
        dest = Endpoint.parse(args.dest, port=args.ssh_port, identity=args.identity,
                              known_hosts=args.known_hosts,
                              remote_command=tuple(shlex.split(args.remote_command)))
        show = not args.no_progress and sys.stderr.isatty()
        label = os.path.basename(args.src)
        if options.method == "rsync":
            with progress_bar(enabled=show, label=label) as on_progress:
                result = transfer.rsync_copy(args.src, dest, options, overwrite=args.overwrite,
                                             progress=on_progress)
        else:
            # The source is opened and its first data asked of the disk before the
            # sender, its SSH client and the progress bar (a thread) are loaded: the
            # disk works meanwhile, and the read-ahead can run in a child process.
            with Source.open(args.src, DEFAULT_CHUNK, direct=True) as source:
                source.prefetch()
                with progress_bar(enabled=show, label=label) as on_progress:
                    result = transfer.stream_copy(source, dest, options, overwrite=args.overwrite,
                                                  resume=not args.no_resume, progress=on_progress)
    except TransferError as e:
        print(f"coldferry copy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("coldferry copy: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


def copy_options(args: argparse.Namespace) -> CopyOptions:
    """The copy's options from its arguments; a refused value is named by its option (``--streams``).

    :raises InvalidArgument: a bad value, or a stream-only option given with ``--method rsync``.
    """
    bwlimit = parse_size(args.bwlimit, "--bwlimit") if args.bwlimit else 0
    options = CopyOptions.named("--", method=args.method, streams=args.streams, channel=args.channel,
                                compress=args.compress, bwlimit=bwlimit, fsync=args.fsync)
    if options.method == "rsync":
        stream_only = [flag for flag, used in (("--no-resume", args.no_resume), ("--fsync", args.fsync),
                                               ("--compress", args.compress != "off"),
                                               ("--channel", args.channel != "direct"),
                                               ("--streams", args.streams != DEFAULT_STREAMS)) if used]
        if stream_only:
            raise transfer.InvalidArgument(what="option for --method rsync", value=" ".join(stream_only),
                                           reason="these apply to the stream method only")
    return options


def run_checksum(args: argparse.Namespace) -> int:
    status = 0
    for path in args.files:
        try:
            print(f"{transfer.file_digest(path)}  {path}")
        except OSError as e:
            print(f"coldferry checksum: {path}: {e.strerror or e}", file=sys.stderr)
            status = 1
    return status


def run_remote_fs(args: argparse.Namespace) -> int:
    from transfer.remotefs import serve_stdio
    return serve_stdio()


def run_receive(args: argparse.Namespace) -> int:
    from transfer.receiver import serve_stdio
    return serve_stdio()
