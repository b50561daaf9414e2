"""The folders are the architecture: which package may import which, checked on the source.

Layers, bottom up:
- ``deepfs`` (the core: wire formats, codec, layout, client library) imports
  no service, no benchmark, no command line;
- the services ``metadata``, ``storage_node``, ``fuse_client`` import the
  core and their own package, never each other;
- ``deepfs.testing`` sits above the services (its in-process cluster runs
  the real servers), so only tests import it;
- ``bench`` may use the core and the services;
- ``deepfs_cli`` (the ``deepfs`` command) may import everything, and
  nothing imports it.

Every ``import`` statement counts, the ones inside functions too: a lazy
import is still a dependency. Processes started by command line
(``python -m metadata``) are not imports and are allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("metadata", "storage_node", "fuse_client")
TESTING = "deepfs.testing"

# (modules checked, modules they must not import)
RULES = [
    ("deepfs", (*SERVICES, "bench", "deepfs_cli", TESTING)),
    *((service, (*(s for s in SERVICES if s != service), "bench", "deepfs_cli", TESTING)) for service in SERVICES),
    (TESTING, ("bench", "deepfs_cli")),
    ("bench", ("deepfs_cli",)),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, relative ones made absolute.

    ``from deepfs import testing`` yields both ``deepfs`` and
    ``deepfs.testing``: the name imported may be a module."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def source_files(package: str) -> list[Path]:
    return sorted((ROOT / package.replace(".", "/")).rglob("*.py"))


def violations(checked: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line imports module`` for every import from ``checked`` into ``forbidden``."""
    exempt = [TESTING] if checked == "deepfs" else []  # deepfs.testing has a rule of its own
    found = []
    for path in source_files(checked):
        if any(_within(_module_name(path), e) for e in exempt):
            continue
        for line, imported in imports_of(path):
            if any(_within(imported, f) for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported}")
    return sorted(set(found))


@pytest.mark.parametrize(("checked", "forbidden"), RULES, ids=[checked for checked, _ in RULES])
def test_package_imports_nothing_above_or_beside_it(checked: str, forbidden: tuple[str, ...]) -> None:
    assert source_files(checked), f"no source files found for {checked}"
    assert violations(checked, forbidden) == []


def test_nothing_outside_the_command_line_and_tests_imports_it() -> None:
    packages = sorted({p.parent.name for p in ROOT.glob("*/__init__.py")} - {"deepfs_cli", "tests"})
    assert {"deepfs", "bench", *SERVICES} <= set(packages)
    assert [v for package in packages for v in violations(package, ("deepfs_cli",))] == []


def test_the_scanner_sees_lazy_and_relative_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules above pass vacuously if the scanner misses imports: check it on a made-up package."""
    package = tmp_path / "deepfs" / "sub"
    package.mkdir(parents=True)
    (tmp_path / "deepfs" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "import os\n"
        "from .. import testing\n"
        "def lazy():\n"
        "    from metadata.server import main\n"
        "    import deepfs_cli.main\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert violations("deepfs", ("metadata", "deepfs_cli", TESTING)) == [
        "deepfs/sub/mod.py:2 imports deepfs.testing",
        "deepfs/sub/mod.py:4 imports metadata.server",
        "deepfs/sub/mod.py:4 imports metadata.server.main",
        "deepfs/sub/mod.py:5 imports deepfs_cli.main",
    ]
