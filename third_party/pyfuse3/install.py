"""Install pyfuse3 with DeepFS's patch into the Python that runs this script.

The problem: upstream pyfuse3 makes every FUSE request wait for a trio lock and an epoll
wake-up, even when the kernel has the next request queued already (a fifth of the mount
daemon's CPU per small file, bench/RESULTS.md "Eighth round"), and cannot tell the kernel
that closing a read-only handle needs no FLUSH. The patch (``deepfs.patch`` beside this
file) lets a request task that has just answered take the next queued request at once,
adds ``FileInfo.noflush``, lets the file system turn the kernel's ``auto_inval_data`` off
(``Operations.auto_inval_data``), and marks the build with ``pyfuse3.deepfs_patch_level``.

Usage: ``<venv>/bin/python third_party/pyfuse3/install.py`` (``make venv`` and the
Containerfile run it). It does nothing when the patched build is installed already;
otherwise it downloads pyfuse3's source release, applies the patch, and builds it with pip
(which needs gcc, pkg-config and libfuse3's headers, as upstream pyfuse3 does). Needs only
the standard library, so it runs before DeepFS itself is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PYFUSE3_VERSION = "3.5.0"
# Raise together with the level the patch sets, so that an older patched build is replaced.
PATCH_LEVEL = 3
PATCH = Path(__file__).with_name("deepfs.patch")


class PatchError(Exception):
    """A hunk of the patch does not match the sources it is applied to."""


def installed_level(python: str = sys.executable) -> int | None:
    """The patch level of the pyfuse3 ``python`` imports: None without pyfuse3, 0 for upstream."""
    probe = "import pyfuse3; print(getattr(pyfuse3, 'deepfs_patch_level', 0))"
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return None
    # The level is the last line: an import that prints something of its own must not stop the build.
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0


def apply_patch(diff: str, root: Path) -> list[Path]:
    """Apply a unified diff (``a/`` and ``b/`` prefixes) under ``root``; returns the files changed.

    Each hunk must match its context exactly once in its file: a source release that moved
    on makes this fail with the hunk named, never patch the wrong place."""
    changed: list[Path] = []
    for path, hunks in _parse(diff):
        target = root / path
        text = target.read_text()
        for number, (old, new) in enumerate(hunks, 1):
            if text.count(old) != 1:
                found = "not found" if old not in text else "found more than once"
                raise PatchError(f"{path}: hunk {number} {found}")
            text = text.replace(old, new)
        target.write_text(text)
        changed.append(target)
    return changed


def _parse(diff: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Split a unified diff into (path, [(old text, new text) per hunk])."""
    files: list[tuple[str, list[tuple[str, str]]]] = []
    old: list[str] = []
    new: list[str] = []
    for line in diff.splitlines(keepends=True):
        if line.startswith("--- "):
            continue
        if line.startswith("+++ "):
            files.append((line[4:].strip().split("/", 1)[1], []))
        elif line.startswith("@@"):
            if not files:
                raise PatchError("a hunk before any file header")
            old, new = [], []
            files[-1][1].append(("", ""))
        elif files and files[-1][1] and line[:1] in (" ", "-", "+", "\n"):
            body = line[1:] if line[:1] != "\n" else "\n"
            if line[:1] != "+":
                old.append(body)
            if line[:1] != "-":
                new.append(body)
            files[-1][1][-1] = ("".join(old), "".join(new))
        elif line.strip():
            raise PatchError(f"unexpected line in the patch: {line.rstrip()!r}")
    return files


def build_and_install(python: str = sys.executable) -> None:
    """Download pyfuse3's source release, patch it, and pip-install it into ``python``."""
    with tempfile.TemporaryDirectory(prefix="deepfs-pyfuse3-") as tmp:
        work = Path(tmp)
        pip = [python, "-m", "pip"]
        subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"pyfuse3=={PYFUSE3_VERSION}", "-d", str(work)], check=True)
        (sdist,) = work.glob("pyfuse3-*.tar.gz")
        with tarfile.open(sdist) as archive:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths outside
                archive.extractall(work, filter="data")
            else:
                archive.extractall(work)
        source = work / f"pyfuse3-{PYFUSE3_VERSION}"
        apply_patch(PATCH.read_text(), source)
        # The local version label tells `pip list` readers which build this is.
        env = dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION=f"{PYFUSE3_VERSION}+deepfs{PATCH_LEVEL}")
        subprocess.run([*pip, "install", "-q", str(source)], check=True, env=env)


def main() -> int:
    if installed_level() == PATCH_LEVEL:
        print(f"pyfuse3 {PYFUSE3_VERSION} with DeepFS's patch is installed")
        return 0
    print(f"building pyfuse3 {PYFUSE3_VERSION} with DeepFS's patch ({PATCH.name})")
    try:
        build_and_install()
    except (subprocess.CalledProcessError, PatchError, ValueError) as exc:
        print(f"install.py: could not install the patched pyfuse3: {exc}", file=sys.stderr)
        return 1
    level = installed_level()
    if level != PATCH_LEVEL:
        print(f"install.py: the installed pyfuse3 reports patch level {level}, not {PATCH_LEVEL}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
