"""``deepfs keys create`` and ``deepfs keys show``: key files for clients, mounts, admins and nodes.

A key is an identity (name, role, uid/gid, subtree, read-only) plus a secret
derived from the cluster secret (``deepfs.auth``); whoever holds the cluster
secret (the operator, on a metadata server's machine) can make any key, and
nothing is recorded anywhere: the metadata server re-derives a key's secret
from the identity a peer presents. docs/SECURITY.md explains the model.

One kind per key, chosen by exactly one of:

- ``--uid N --gid N [--groups a,b]``: a client acting as that user (the server checks mode bits);
- ``--trusted-mount``: the FUSE daemon of a mount host, acting for the uid of each kernel request;
- ``--admin``: acts as root, may drain and remove nodes and set layouts on ``/``;
- ``--node``: a storage node (its file also carries the service secret that checks tickets and
  capabilities; it takes no ``--path``, ``--read-only`` or uid).

``--path`` limits a client or mount key to a subtree, ``--read-only`` to
reads. ``keys show`` prints a key file's identity, never its secret;
``keys create-secret FILE`` makes a new cluster secret (for a metadata
server's ``secret_file``: a new secret revokes every key made from the old).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import click

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_CLIENT,
    ROLE_NODE,
    Identity,
    create_cluster_secret,
    load_cluster_secret,
    make_key,
    read_key_file,
    write_key_file,
)
from deepfs.errors import ConfigError
from deepfs_cli.common import fail

SECRET_NAME = "cluster.secret"


@click.group()
def keys() -> None:
    """Create and inspect key files (see docs/SECURITY.md)."""


@keys.command("create")
@click.argument("name")
@click.option("--path", "subtree", default="/", show_default=True, help="limit the key to this subtree")
@click.option("--uid", type=click.IntRange(min=0), help="a client key acting as this uid (with --gid)")
@click.option("--gid", type=click.IntRange(min=0), help="the client key's primary gid")
@click.option("--groups", default="", metavar="GID,GID", help="the client key's supplementary groups")
@click.option("--trusted-mount", is_flag=True, help="a FUSE mount daemon's key: acts for each request's uid")
@click.option("--admin", is_flag=True, help="an administrator's key (acts as root, admin operations)")
@click.option("--node", is_flag=True, help="a storage node's key")
@click.option("--read-only", is_flag=True, help="refuse every change made with this key")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help="the cluster secret (the metadata server's --secret-file)")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="a cluster's data directory instead: its keys/cluster.secret (deepfs up) or cluster.secret")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="where to write the key [default: ./NAME.key]")
@click.option("--force", is_flag=True, help="overwrite an existing key file")
def create(name: str, subtree: str, uid: int | None, gid: int | None, groups: str, trusted_mount: bool, admin: bool,
           node: bool, read_only: bool, secret_file: Path | None, data_dir: Path | None, output: Path | None,
           force: bool) -> None:
    """Write a key file for NAME, derived from the cluster secret."""
    try:
        identity = identity_from_options(name, subtree, uid, gid, groups, trusted_mount, admin, node, read_only)
        secret = load_cluster_secret(find_secret_file(secret_file, data_dir))
        key = make_key(secret, identity)
    except (ConfigError, ValueError, OSError) as exc:
        fail(_one_line(exc))
    path = output or Path(f"{name}.key")
    if path.exists() and not force:
        fail(f"{path} exists; pass --force to overwrite it")
    try:
        write_key_file(path, key)
    except (ConfigError, OSError) as exc:
        fail(f"cannot write {path}: {_one_line(exc)}")
    click.echo(f"wrote {path} (mode 0600)")
    click.echo(f"identity: {key.identity.describe()}")


@keys.command("show")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def show(file: Path) -> None:
    """Print the identity a key file carries (never its secret)."""
    try:
        key = read_key_file(file)
    except (ConfigError, ValueError, OSError) as exc:
        fail(_one_line(exc))
    click.echo(f"key file: {file}")
    click.echo(f"identity: {key.identity.describe()}")
    if key.service_secret is not None:
        click.echo("service secret: present (node key)")


@keys.command("create-secret")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def create_secret(file: Path) -> None:
    """Write a new cluster secret (32 random bytes, mode 0600) to FILE; an existing FILE is kept."""
    try:
        create_cluster_secret(file)
    except FileExistsError:
        fail(f"{file} exists: a new secret would revoke every key made from it; remove it first if that is meant")
    except OSError as exc:
        fail(f"cannot write {file}: {_one_line(exc)}")
    click.echo(f"wrote the cluster secret {file} (mode 0600): give it to the metadata server only "
               "(--secret-file / [meta] secret_file)")


def identity_from_options(name: str, subtree: str = "/", uid: int | None = None, gid: int | None = None,
                          groups: str = "", trusted_mount: bool = False, admin: bool = False, node: bool = False,
                          read_only: bool = False) -> Identity:
    """The identity the options describe; ``ValueError`` (one line) for a combination that makes no sense."""
    kinds = [flag for flag, chosen in (("--uid/--gid", uid is not None or gid is not None),
                                       ("--trusted-mount", trusted_mount), ("--admin", admin),
                                       ("--node", node)) if chosen]
    if not kinds:
        raise ValueError("say what the key is for: --uid N --gid N, --trusted-mount, --admin or --node")
    if len(kinds) > 1:
        raise ValueError(f"{' and '.join(kinds)} exclude each other: one kind of key at a time")
    if (uid is None) != (gid is None):
        raise ValueError("--uid and --gid go together")
    if groups and uid is None:
        raise ValueError("--groups needs --uid and --gid")
    if not subtree.startswith("/"):
        raise ValueError(f"--path must be absolute, not {subtree!r}")
    subtree = posixpath.normpath(subtree) if subtree != "/" else "/"
    if subtree.startswith("//"):
        subtree = "/" + subtree.lstrip("/")
    if node:
        if subtree != "/" or read_only:
            raise ValueError("a --node key takes no --path or --read-only")
        return Identity(name, ROLE_NODE)
    if admin:
        return Identity(name, ROLE_ADMIN, path=subtree, read_only=read_only)
    if trusted_mount:
        return Identity(name, ROLE_CLIENT, path=subtree, read_only=read_only, trusted_mount=True)
    assert uid is not None and gid is not None
    return Identity(name, ROLE_CLIENT, uid=uid, gid=gid, groups=_parse_groups(groups), path=subtree,
                    read_only=read_only)


def _parse_groups(text: str) -> tuple[int, ...]:
    try:
        groups = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--groups takes numeric gids separated by commas, not {text!r}") from None
    if any(g < 0 for g in groups):
        raise ValueError("--groups takes gids >= 0")
    return groups


def find_secret_file(secret_file: Path | None, data_dir: Path | None) -> Path:
    """``--secret-file``, else the cluster secret under ``--data-dir`` (a ``deepfs up`` directory or a
    metadata server's own); exactly one of the two."""
    if (secret_file is None) == (data_dir is None):
        raise ValueError("give the cluster secret: --secret-file FILE or --data-dir DIR (one of them)")
    if secret_file is not None:
        return secret_file
    assert data_dir is not None
    candidates = [data_dir / "keys" / SECRET_NAME, data_dir / SECRET_NAME, data_dir / "meta" / SECRET_NAME]
    try:  # a local cluster given an outside secret (LocalCluster(secret_file=...)) names it in its state
        recorded = json.loads((data_dir / "cluster.json").read_text()).get("secret_file")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, str) and recorded:
        candidates.insert(0, Path(recorded))
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ValueError(f"no cluster secret in {data_dir} (looked for keys/{SECRET_NAME}, {SECRET_NAME}, "
                     f"meta/{SECRET_NAME}); pass --secret-file")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
