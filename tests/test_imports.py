"""Imports flow one way: pallas_kernels -> models -> convert, routers -> polar_jax.

Every module of the five packages is parsed (not imported); an import of a higher package, or
between convert and routers, fails unless its target is one of the leaf modules, which import
nothing of the project but `polar_jax.errors`. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"pallas_kernels": 0, "models": 1, "convert": 2, "routers": 2, "polar_jax": 3}
# Each leaf and the project modules it may import.
LEAVES = {
    "polar_jax.errors": set(),
    "polar_jax.windows": set(),
    "polar_jax.dtypes": {"polar_jax.errors"},
    "polar_jax.files": {"polar_jax.errors"},
    "polar_jax.memory": {"polar_jax.errors"},
    "polar_jax.validate": {"polar_jax.errors"},
}
TRAINING_MODULES = ("routers.collect", "routers.pipeline", "routers.train")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def project_imports(source: str, package: str) -> set[str]:
    """The project modules that `source`, a module of `package`, imports anywhere in its body;
    `from pkg import sub` names the submodule `pkg.sub` where one exists."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package up `level - 1` packages
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = [f"{base}.{alias.name}" for alias in node.names]
            found.update(sub if _is_module(sub) else base for sub in subs)
    return {name for name in found if name.split(".")[0] in RANK}


def _modules():
    """(module name, its package, its source) of every module of the five packages."""
    for top in RANK:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = _module_name(path)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            yield module, package, path.read_text()


def test_imports_flow_one_way():
    upward = []
    for module, package, text in _modules():
        source = module.split(".")[0]
        for target in sorted(project_imports(text, package)):
            dest = target.split(".")[0]
            if target in LEAVES or dest == source:
                continue
            if RANK[dest] > RANK[source] or {source, dest} == {"convert", "routers"}:
                upward.append(f"{module} imports {target}")
    assert not upward, "imports against the flow:\n" + "\n".join(upward)


def test_leaves_import_no_other_project_module():
    sources = {module: (package, text) for module, package, text in _modules()}
    for leaf, allowed in LEAVES.items():
        package, text = sources[leaf]
        extra = project_imports(text, package) - allowed
        assert not extra, f"{leaf} imports {sorted(extra)}"


def test_the_checker_sees_submodules_nested_and_relative_imports():
    source = ("import numpy\nfrom polar_jax import evaluate, generate\nfrom . import layers\n\n"
              "def f():\n    import routers.train\n")
    assert project_imports(source, "models") == {
        "polar_jax.evaluate", "polar_jax", "models.layers", "routers.train"}


def test_decoding_loads_no_training_code():
    """`polar_jax.decode` in a fresh interpreter: no training module of the project loads, and
    optax, if it loads at all, is imported by no project module (flax.nnx imports it itself)."""
    probe = f"""
import importlib.abc, json, sys
importers = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "optax":
            frame = sys._getframe(1)
            while frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen")):
                frame = frame.f_back
            importers.append(frame.f_globals.get("__name__"))
sys.meta_path.insert(0, Spy())
import polar_jax.decode
print(json.dumps({{"importers": importers,
                  "training": [m for m in {TRAINING_MODULES!r} if m in sys.modules]}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["training"] == []
    assert all(name.split(".")[0] not in RANK for name in report["importers"]), report
