"""Mount options: one typed dataclass, parsed from the command line.

``deepfs mount`` and ``python -m fuse_client`` share this parser, so the
options, their defaults and their help text live in one place. What each
caching option changes is written up in ``docs/FUSE.md``.

Who may enter the mount: the kernel always checks mode bits against our
attributes (``default_permissions``). On top of that FUSE lets only the
mounting user in unless ``allow_other`` is set. A root mount is usually one a
whole training cluster shares, so root gets ``allow_other`` by default (as
JuiceFS does); ``--no-allow-other`` opts out. Other users keep it off unless
they ask, and may ask only if /etc/fuse.conf says ``user_allow_other``.

The mount authenticates with a key file (``--key``; else ``$DEEPFS_KEY``,
else ``~/.config/deepfs/key``), resolved once by ``deepfs mount`` and handed
to the daemon as an absolute path. A ``--trusted-mount`` key lets the daemon
act for the uid/gid of each kernel request; the metadata server then leaves
mode checks to the kernel, so ``default_permissions`` is never dropped (it
is in every mount's options, and ``-o`` cannot remove it). A plain client key
works too: the server acts as the key's uid for every request.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from deepfs.auth import DEFAULT_KEY_PATH, KEY_ENV, AuthError
from deepfs.client._transport import NO_KEY
from deepfs.config import ClientConfig
from deepfs.rpc import format_addresses

DEFAULT_ATTR_TIMEOUT_S = 1.0
DEFAULT_ENTRY_TIMEOUT_S = 1.0
DEFAULT_FAILOVER_TIMEOUT_S = ClientConfig.meta_failover_s
FUSE_CONF = Path("/etc/fuse.conf")


def default_allow_other(euid: int) -> bool:
    """Root mounts are shared mounts: other users in, the kernel checking mode bits."""
    return euid == 0


def key_path(given: Path | None, environ: dict[str, str] | None = None) -> Path:
    """The key file a mount uses: ``given``, else ``$DEEPFS_KEY``, else ``~/.config/deepfs/key`` if
    it exists (``deepfs.auth.resolve_key``'s order), as an absolute path; ``AuthError`` if none."""
    env = os.environ if environ is None else environ
    if given is not None and str(given):
        return Path(os.path.abspath(os.path.expanduser(given)))
    if env.get(KEY_ENV):
        return Path(os.path.abspath(os.path.expanduser(env[KEY_ENV])))
    default = Path(os.path.expanduser(DEFAULT_KEY_PATH))
    if default.exists():
        return default.absolute()
    raise AuthError(NO_KEY)


def user_allow_other_enabled(fuse_conf_text: str) -> bool:
    """Whether fuse.conf lets non-root users mount with allow_other (fusermount3's rule:
    ``user_allow_other`` alone on a line, surrounding blanks ignored, ``#`` lines comments)."""
    return any(line.strip() == "user_allow_other" for line in fuse_conf_text.splitlines())


def allow_other_refusal(allow_other: bool, euid: int, fuse_conf_text: str | None) -> str | None:
    """Why fusermount3 would refuse this mount's allow_other (None: it will not);
    ``fuse_conf_text`` None means there is no fuse.conf."""
    if not allow_other or euid == 0 or user_allow_other_enabled(fuse_conf_text or ""):
        return None
    return (f"--allow-other needs root or 'user_allow_other' in {FUSE_CONF}; "
            "mount without it (only you get in) or ask an administrator to enable it")


@dataclass
class MountOptions:
    meta_address: str
    mountpoint: Path
    foreground: bool = False
    attr_timeout_s: float = DEFAULT_ATTR_TIMEOUT_S  # kernel and daemon attribute cache
    entry_timeout_s: float = DEFAULT_ENTRY_TIMEOUT_S  # kernel name → inode cache
    negative_timeout_s: float = 0.0  # kernel cache of "no such name"; 0 = never cached
    # how long a metadata request keeps trying unreachable servers (the next listed one each time) before
    # EIO; also how long the mount itself waits for the cluster at start
    failover_timeout_s: float = DEFAULT_FAILOVER_TIMEOUT_S
    # let users other than the mounting one in (needs root or user_allow_other); on for root
    allow_other: bool = field(default_factory=lambda: default_allow_other(os.geteuid()))
    readahead_stripes: int = 2  # whole stripes fetched ahead of a sequential reader; 0 = off
    kernel_readahead_kb: int = 1024  # the kernel's own read-ahead window for this mount (root only)
    max_tasks: int = 64  # FUSE requests served concurrently
    log_file: Path | None = None  # background mode: where the daemon logs
    metrics_port: int | None = None  # Prometheus /metrics on metrics_host:metrics_port; None: not served
    metrics_host: str = "127.0.0.1"
    debug: bool = False
    extra_fuse_options: list[str] = field(default_factory=list)
    key: Path | None = None  # the key file (None: resolved as deepfs.auth.resolve_key does)
    tls_ca: Path | None = None  # a TLS cluster: connect with TLS, verifying the servers with this CA

    def client_config(self) -> ClientConfig:
        return ClientConfig(meta_address=self.meta_address, readahead_stripes=self.readahead_stripes,
                            meta_failover_s=self.failover_timeout_s,
                            key_file=str(self.key or ""), tls=self.tls_ca is not None,
                            tls_ca_file=str(self.tls_ca or ""))

    def fuse_options(self) -> set[str]:
        """libfuse mount options: the kernel checks permissions against our attributes.

        ``default_permissions`` always: a trusted-mount key makes the metadata server
        trust the uid/gid of each request, so the kernel's mode checks are the checks."""
        opts = {"fsname=deepfs", "subtype=deepfs", "noatime"}
        if self.allow_other:
            opts.add("allow_other")
        opts.update(self.extra_fuse_options)
        opts.add("default_permissions")
        return opts

    def to_args(self) -> list[str]:
        """The options as command-line arguments (to start a foreground daemon)."""
        args = [
            self.meta_address, str(self.mountpoint), "--foreground",
            "--attr-timeout", str(self.attr_timeout_s), "--entry-timeout", str(self.entry_timeout_s),
            "--negative-timeout", str(self.negative_timeout_s), "--failover-timeout", str(self.failover_timeout_s),
            "--readahead-stripes", str(self.readahead_stripes),
            "--kernel-readahead-kb", str(self.kernel_readahead_kb),
            "--max-tasks", str(self.max_tasks),
        ]
        args.append("--allow-other" if self.allow_other else "--no-allow-other")
        if self.debug:
            args.append("--debug")
        if self.key is not None:
            args += ["--key", str(self.key)]
        if self.tls_ca is not None:
            args += ["--tls-ca", str(self.tls_ca)]
        if self.metrics_port is not None:
            args += ["--metrics-port", str(self.metrics_port), "--metrics-host", self.metrics_host]
        for opt in self.extra_fuse_options:
            args += ["-o", opt]
        return args


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


class _OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are one line on stderr, like every other deepfs error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _addresses(text: str) -> str:
    """META_ADDR: one or more HOST:PORT, comma-separated (``deepfs.rpc.parse_addresses``)."""
    try:
        return format_addresses(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(prog: str = "deepfs mount") -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog=prog,
        description="Mount a DeepFS cluster as a POSIX file system (FUSE). "
        "Caching rules and consistency between mounts: docs/FUSE.md.",
    )
    parser.add_argument("meta_address", metavar="META_ADDR", type=_addresses,
                        help="metadata server, host:port; or several of the cluster's, host1:port1,host2:port2 "
                        "(the mount fails over between them)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", type=Path, help="an existing empty directory")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground, log to stderr")
    mode.add_argument("--background", dest="foreground", action="store_false",
                      help="return once mounted; the daemon keeps running (default)")
    parser.add_argument("--attr-timeout", dest="attr_timeout_s", type=_non_negative, default=DEFAULT_ATTR_TIMEOUT_S,
                        metavar="S", help="seconds attributes are cached (default %(default)s)")
    parser.add_argument("--entry-timeout", dest="entry_timeout_s", type=_non_negative,
                        default=DEFAULT_ENTRY_TIMEOUT_S, metavar="S",
                        help="seconds name lookups are cached (default %(default)s)")
    parser.add_argument("--negative-timeout", dest="negative_timeout_s", type=_non_negative, default=0.0,
                        metavar="S", help="seconds a missing name is cached (default 0: not cached)")
    parser.add_argument("--failover-timeout", dest="failover_timeout_s", type=_positive,
                        default=DEFAULT_FAILOVER_TIMEOUT_S, metavar="S",
                        help="seconds a metadata request keeps trying unreachable servers before it fails "
                        "with EIO; also how long mounting waits for the cluster (default %(default)s)")
    parser.add_argument("--allow-other", action=argparse.BooleanOptionalAction, default=None,
                        help="let other users use the mount, the kernel checking mode bits "
                        "(default: on when mounting as root, off otherwise)")
    parser.add_argument("--readahead-stripes", type=int, default=2, metavar="N",
                        help="whole stripes prefetched for sequential readers (default %(default)s, 0 = off)")
    parser.add_argument("--kernel-readahead-kb", type=int, default=1024, metavar="KB",
                        help="kernel read-ahead window of the mount (default %(default)s; root only)")
    parser.add_argument("--max-tasks", type=int, default=64, metavar="N",
                        help="FUSE requests served concurrently (default %(default)s)")
    parser.add_argument("--log-file", type=Path, default=None, help="daemon log in background mode")
    parser.add_argument("-o", dest="extra_fuse_options", action="append", default=[], metavar="OPT",
                        help="extra libfuse mount option (repeatable)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus /metrics on this port (0: any free port; default: not served)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address the metrics endpoint listens on (default %(default)s)")
    parser.add_argument("-d", "--debug", action="store_true", help="log every FUSE request")
    parser.add_argument("--key", type=Path, default=None, metavar="FILE",
                        help=f"key file to authenticate with (default: ${KEY_ENV}, then {DEFAULT_KEY_PATH})")
    parser.add_argument("--tls-ca", type=Path, default=None, metavar="FILE",
                        help="the cluster runs TLS: connect with TLS, verifying the servers with this CA (PEM)")
    return parser


def parse_args(argv: list[str], prog: str = "deepfs mount", euid: int | None = None) -> MountOptions:
    """``euid``: the user mounting (default: this process's), which decides ``allow_other``'s default."""
    ns = build_parser(prog).parse_args(argv)
    if ns.readahead_stripes < 0 or ns.max_tasks < 1 or ns.kernel_readahead_kb < 0:
        build_parser(prog).error("--readahead-stripes and --kernel-readahead-kb must be >= 0, --max-tasks >= 1")
    if ns.allow_other is None:
        ns.allow_other = default_allow_other(os.geteuid() if euid is None else euid)
    return MountOptions(**vars(ns))
