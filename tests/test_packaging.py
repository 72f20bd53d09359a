"""What the package promises about itself: imports, declared dependencies, Python 3.10."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sieve_edge_evaluate_is_always_the_module_and_import_needs_no_torch():
    code = ("import sys, sieve_edge\n"
            "assert 'torch' not in sys.modules\n"
            "first = sieve_edge.evaluate\n"
            "import sieve_edge.evaluate as module\n"
            "assert first is module and sieve_edge.evaluate is module and callable(module.evaluate)\n"
            "from sieve_edge import evaluate\n"
            "assert evaluate is module\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield node, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node, [node.module]


def test_tomllib_falls_back_to_tomli_wherever_it_is_imported():
    # Python 3.10 (requires-python >= 3.10) has no tomllib; pyproject declares tomli there
    for path in sorted((ROOT / "sieve_edge").rglob("*.py")):
        tree = ast.parse(path.read_text())
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    name == "tomli" for h in node.handlers for n in h.body for _, names in _imports(n)
                    for name in names):
                guarded.update(id(n) for n in ast.walk(node))
        for node, names in _imports(tree):
            if "tomllib" in names:
                assert id(node) in guarded, f"{path.relative_to(ROOT)}:{node.lineno}: tomllib without tomli fallback"


def test_every_third_party_import_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # an optional extra's package is declared too: its import sits behind a clear error naming the extra
    deps = project["dependencies"] + [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    declared = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_")
                for d in deps}
    aliases = {"yaml": "pyyaml", "llama_cpp": "llama_cpp_python"}  # import name -> distribution, where they differ
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in sorted((ROOT / "sieve_edge").rglob("*.py")):
        for _, names in _imports(ast.parse(path.read_text())):
            for name in names:
                top = name.split(".")[0]
                if top in stdlib or top == "sieve_edge":
                    continue
                if aliases.get(top, top).lower() not in declared:
                    missing.add(f"{top} ({path.relative_to(ROOT)})")
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"
