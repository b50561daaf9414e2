"""Real programs on the mount: cp, diff, tar, git, python -m venv + pip, sqlite3, fio."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 90) -> str:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result.stdout


def make_tree(root: Path) -> Path:
    """Files of many sizes, nested directories, symlinks (relative, absolute,
    dangling, to a directory), hard links, odd modes and old mtimes."""
    root.mkdir()
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    sizes = [0, 1, 4095, 4096, 65537, 262144, 262145, 700_001]
    for i, size in enumerate(sizes):
        (root / "a" / f"f{i}.bin").write_bytes(os.urandom(size))
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n" * 1000)
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    os.symlink("a/f1.bin", root / "rel-link")
    os.symlink("a/b", root / "dir-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "a" / "f5.bin", root / "hard-1")
    os.link(root / "a" / "f5.bin", root / "a" / "b" / "hard-2")
    os.utime(root / "a" / "f3.bin", ns=(1_500_000_000_123_456_789, 1_500_000_000_987_654_321))
    return root


def assert_same_tree(left: Path, right: Path) -> None:
    run("diff", "-r", "--no-dereference", left, right)
    for dirpath, dirnames, filenames in os.walk(left):
        for name in dirnames + filenames:
            a = Path(dirpath) / name
            b = right / a.relative_to(left)
            sa, sb = os.lstat(a), os.lstat(b)
            assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), a
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), a
            if not stat.S_ISDIR(sa.st_mode):
                assert sa.st_nlink == sb.st_nlink, a
                assert sa.st_mtime_ns == sb.st_mtime_ns, a
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(a) == os.readlink(b)


def test_cp_a_and_diff_r(mnt_dir: Path, tmp_path: Path) -> None:
    source = make_tree(tmp_path / "source")
    run("cp", "-a", source, mnt_dir / "copy")
    assert_same_tree(source, mnt_dir / "copy")
    assert os.stat(mnt_dir / "copy" / "hard-1").st_ino == os.stat(mnt_dir / "copy" / "a" / "f5.bin").st_ino
    run("cp", "-a", mnt_dir / "copy", tmp_path / "back")  # and out again
    assert_same_tree(source, tmp_path / "back")


def test_tar_create_and_extract(mnt_dir: Path, tmp_path: Path) -> None:
    source = make_tree(mnt_dir / "source")
    run("tar", "--format=posix", "-C", mnt_dir, "-cf", mnt_dir / "tree.tar", "source")  # keeps ns times
    assert (mnt_dir / "tree.tar").stat().st_size > 1_000_000
    (mnt_dir / "out").mkdir()
    run("tar", "-C", mnt_dir / "out", "-xpf", mnt_dir / "tree.tar")
    assert_same_tree(source, mnt_dir / "out" / "source")
    run("tar", "-C", tmp_path, "-xpf", mnt_dir / "tree.tar")  # the archive is a valid one
    assert_same_tree(source, tmp_path / "source")


def test_git_init_commit_log(mnt_dir: Path) -> None:
    env = {**os.environ, "HOME": str(mnt_dir), "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "T",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}
    repo = mnt_dir / "repo"
    run("git", "init", "-q", "-b", "main", repo, env=env)
    for i in range(3):
        (repo / f"file{i}.txt").write_text(f"version {i}\n" * (i + 1) * 100)
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / "data.bin").write_bytes(os.urandom(50_000 * (i + 1)))
        run("git", "add", "-A", cwd=repo, env=env)
        run("git", "commit", "-q", "-m", f"commit {i}", cwd=repo, env=env)
    run("git", "mv", "file0.txt", "renamed.txt", cwd=repo, env=env)
    run("git", "commit", "-q", "-m", "rename", cwd=repo, env=env)
    log = run("git", "log", "--format=%s", cwd=repo, env=env).split("\n")
    assert log[:4] == ["rename", "commit 2", "commit 1", "commit 0"]
    assert run("git", "status", "--porcelain", cwd=repo, env=env) == ""
    run("git", "gc", "-q", cwd=repo, env=env)  # packs objects: rename, fsync, mmap of packs
    run("git", "fsck", "--strict", cwd=repo, env=env)
    run("git", "clone", "-q", repo, mnt_dir / "clone", env=env)
    assert (mnt_dir / "clone" / "renamed.txt").read_text() == "version 0\n" * 100


def test_python_venv_and_pip_install(mnt_dir: Path) -> None:
    package = mnt_dir / "tinypkg"
    (package / "src" / "tinypkg").mkdir(parents=True)
    (package / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "tinypkg"
        version = "1.2.3"
    """))
    (package / "src" / "tinypkg" / "__init__.py").write_text("VALUE = 'installed on deepfs'\n")
    venv = mnt_dir / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    # Build the wheel on the mount (setuptools writes build/ and egg-info there), then install it into the venv.
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-build-isolation", "--no-deps",
        "-w", mnt_dir / "wheels", package, env=env)
    wheel = next((mnt_dir / "wheels").glob("tinypkg-1.2.3-*.whl"))
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-index", wheel,
        env=env)
    out = run(venv / "bin" / "python", "-c", "import tinypkg, sys; print(tinypkg.VALUE, sys.prefix)")
    assert out.split() == ["installed", "on", "deepfs", str(venv)]


def test_sqlite3(mnt_dir: Path) -> None:
    db = mnt_dir / "test.db"
    rows = "\n".join(f"INSERT INTO t VALUES ({i}, 'row {i}', randomblob(200));" for i in range(2000))
    script = f"""
        PRAGMA journal_mode=DELETE;
        CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, blob BLOB);
        BEGIN; {rows} COMMIT;
        CREATE INDEX t_name ON t(name);
        UPDATE t SET name = name || '!' WHERE id % 3 = 0;
        DELETE FROM t WHERE id % 7 = 0;
    """
    run("sqlite3", db, input_script(script))
    out = run("sqlite3", db, "SELECT count(*), sum(id), count(*) FILTER (WHERE name LIKE '%!') FROM t; "
              "PRAGMA integrity_check;")
    expected = [i for i in range(2000) if i % 7]
    assert out.split() == [f"{len(expected)}|{sum(expected)}|{sum(1 for i in expected if i % 3 == 0)}", "ok"]
    run("sqlite3", db, "PRAGMA journal_mode=WAL; INSERT INTO t VALUES (5000, 'wal', NULL);")
    assert run("sqlite3", db, "SELECT name FROM t WHERE id = 5000;").strip() == "wal"


def input_script(text: str) -> str:
    """sqlite3 takes SQL as its last argument; one line keeps it a single argument."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def test_fio_random_writes_verify(mnt_dir: Path) -> None:
    out = run(
        "fio", "--name=randwrite-verify", f"--filename={mnt_dir / 'fio.dat'}", "--size=8M", "--bs=4k",
        "--rw=randwrite", "--ioengine=psync", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
        "--end_fsync=1", "--randrepeat=0", "--output-format=terse", "--terse-version=3",
        "--verify_state_save=0",  # else fio leaves a *-verify.state file in the working directory
    )
    fields = out.strip().splitlines()[-1].split(";")
    assert fields[4] == "0", f"fio reported error {fields[4]}"  # terse v3: field 5 is the error code
    shutil.copyfile(mnt_dir / "fio.dat", mnt_dir / "copy.dat")  # and the file still reads whole
    assert (mnt_dir / "copy.dat").stat().st_size == 8 << 20
