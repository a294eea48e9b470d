"""The shape of the project: what is installed, and what the core may import."""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject() -> None:
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set()
    for top, package in (("core", "pallet"), ("plugins", "pallet.plugins")):
        for init in (REPO / top).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(REPO / top).parts]))
    assert found == listed


def test_core_never_imports_a_plugin_module_by_name() -> None:
    for path in (REPO / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith("pallet.plugins"), f"{path}: imports {name}"


def test_builtin_plugins_are_entry_points() -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pallet.plugins")}
    for name in (
        "storage_vfs",
        "storage_overlay",
        "storage_btrfs",
        "storage_devmapper",
        "net_bridge",
        "exec_native",
    ):
        assert eps[name] == f"pallet.plugins.{name}"


def test_no_top_level_core_or_plugins_module_is_installed() -> None:
    import subprocess
    import sys

    code = "import importlib.util as u; print(u.find_spec('core'), u.find_spec('plugins'))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "None None"
