"""Cluster secret files and key files on disk (the only I/O of ``deepfs.auth``).

Rules: secrets are written atomically (a temporary file in the same folder,
fsync, rename) with mode 0600, so a crash never leaves half a secret and no
other user reads one. The cluster secret file holds 32 raw bytes (64 hex
digits are accepted too, for secrets pasted by hand). A key file is JSON: the
identity in readable fields and the secrets in hex. Anything unreadable or
malformed is one ``ConfigError`` line naming the file.
"""

from __future__ import annotations

import binascii
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from deepfs.auth.identity import ROLE_META, ROLE_NODE, Identity
from deepfs.auth.keys import SECRET_BYTES, Key, new_cluster_secret
from deepfs.errors import ConfigError

KEY_ENV = "DEEPFS_KEY"
DEFAULT_KEY_PATH = "~/.config/deepfs/key"
KEY_FILE_VERSION = 1


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600; FileExistsError if present and not ``replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic create-if-absent
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_cluster_secret(path: str | os.PathLike[str]) -> bytes:
    """A new cluster secret in ``path`` (mode 0600); FileExistsError if the file exists."""
    secret = new_cluster_secret()
    _write_private(Path(path), secret, replace=False)
    return secret


def load_cluster_secret(path: str | os.PathLike[str]) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read cluster secret {path}: {exc.strerror or exc}") from exc
    if len(data) == SECRET_BYTES:
        return data
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ConfigError(f"cannot read cluster secret {path}: want {SECRET_BYTES} bytes "
                          f"(or {2 * SECRET_BYTES} hex digits), found {len(data)} bytes")
    return secret


def load_or_create_cluster_secret(path: str | os.PathLike[str]) -> tuple[bytes, bool]:
    """``(secret, created)``: the secret in ``path``, created there first if the file does not exist."""
    if not os.path.lexists(path):
        try:
            return create_cluster_secret(path), True
        except FileExistsError:
            pass  # another process created it first
    return load_cluster_secret(path), False


def key_to_json(key: Key) -> dict[str, Any]:
    ident = key.identity
    doc: dict[str, Any] = {
        "version": KEY_FILE_VERSION,
        "name": ident.name, "role": ident.role, "uid": ident.uid, "gid": ident.gid,
        "groups": list(ident.groups), "path": ident.path, "read_only": ident.read_only,
        "trusted_mount": ident.trusted_mount,
        "secret": key.secret.hex(),
    }
    if key.service_secret is not None:
        doc["service_secret"] = key.service_secret.hex()
    return doc


def key_from_json(doc: Any) -> Key:
    """A key from its JSON document; ValueError with a short reason if malformed."""
    if not isinstance(doc, dict) or doc.get("version") != KEY_FILE_VERSION:
        raise ValueError(f"not a DeepFS key file (want a JSON object with \"version\": {KEY_FILE_VERSION})")
    try:
        identity = Identity(doc["name"], doc.get("role", "client"), doc.get("uid", 0), doc.get("gid", 0),
                            tuple(doc.get("groups", ())), doc.get("path", "/"), doc.get("read_only", False),
                            doc.get("trusted_mount", False))
    except KeyError as exc:
        raise ValueError(f"missing field {exc}") from exc
    except TypeError as exc:
        raise ValueError(f"bad field: {exc}") from exc
    if identity.role == ROLE_META:
        raise ValueError("role meta never has a key file")
    secret = _hex_secret(doc.get("secret"), "secret")
    service = doc.get("service_secret")
    if identity.role == ROLE_NODE:
        return Key(identity, secret, _hex_secret(service, "service_secret"))
    if service is not None:
        raise ValueError("only node keys carry a service_secret")
    return Key(identity, secret)


def _hex_secret(value: object, field: str) -> bytes:
    try:
        secret = bytes.fromhex(value) if isinstance(value, str) else b""
    except (ValueError, binascii.Error):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"{field} must be {2 * SECRET_BYTES} hex digits")
    return secret


def write_key_file(path: str | os.PathLike[str], key: Key) -> None:
    """Write ``key`` as JSON (mode 0600, atomic; an existing file is replaced)."""
    if key.identity.role == ROLE_META:
        raise ConfigError("role meta never has a key file")
    data = (json.dumps(key_to_json(key), indent=2) + "\n").encode()
    _write_private(Path(path), data, replace=True)


def read_key_file(path: str | os.PathLike[str]) -> Key:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read key file {path}: {reason}") from exc
    try:
        return key_from_json(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"cannot read key file {path}: {' '.join(str(exc).split())}") from exc


def resolve_key(key: Key | str | os.PathLike[str] | None = None) -> Key | None:
    """An explicit key, or the key file at a path; else ``$DEEPFS_KEY``; else ``DEFAULT_KEY_PATH`` if it
    exists; else None."""
    if isinstance(key, Key):
        return key
    if key is not None and str(key):
        return read_key_file(os.path.expanduser(os.fspath(key)))
    env = os.environ.get(KEY_ENV, "")
    if env:
        return read_key_file(os.path.expanduser(env))
    default = os.path.expanduser(DEFAULT_KEY_PATH)
    if os.path.exists(default):
        return read_key_file(default)
    return None
