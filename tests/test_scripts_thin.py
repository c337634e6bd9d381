"""scripts/ holds entry points only (issue 23, item 3): what the benchmarks and their tests
share lives in the installed package, conserve_jax/bench/. So no script edits the import
path, no test imports a script through it (a test that needs a script loads it by file
path, as test_proto_fresh.py does with gen_proto.py), every script prints its --help from
any directory, and the benchmark helpers keep their imports light: torch never enters the
engine's process (the peers run in processes of their own), and the pure helpers need no
JAX."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
TESTS = sorted((ROOT / "tests").rglob("*.py"))


def _sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys")


def test_no_script_touches_sys_path():
    bad = [p.name for p in SCRIPTS if "sys.path" in p.read_text()]
    assert not bad, f"scripts that mention sys.path (import from conserve_jax instead): {bad}"


def test_no_test_imports_from_scripts():
    """No import of a module named like a script (or of `scripts`), and no sys.path edit
    that names scripts/."""
    names = {p.stem for p in SCRIPTS} | {"scripts"}
    bad = []
    for path in TESTS:
        source = path.read_text()
        tree = ast.parse(source, str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            else:
                mods = []
            bad += [f"{path.name}:{node.lineno} imports {m}" for m in mods
                    if m.split(".")[0] in names]
            if isinstance(node, ast.stmt) and not isinstance(
                    node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If,
                           ast.With, ast.For, ast.While, ast.Try)) \
                    and any(_sys_path(n) for n in ast.walk(node)) \
                    and "scripts" in (ast.get_source_segment(source, node) or "").lower():
                bad.append(f"{path.name}:{node.lineno} puts scripts/ on sys.path")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_prints_its_help_from_anywhere(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"usage: {script.name}")


def test_bench_modules_import_light():
    """Importing the helpers loads no JAX and no torch; the benchmarks load no torch."""
    light = ["script_io", "peers", "coserve_workload", "coserve_report", "coserve_pareto",
             "coserve_accounting", "ecoserve_workload", "deadlines_report", "load_forecast"]
    heavy = ["coserve", "ecoserve", "engine_speed", "step_profile", "latency_model_accuracy"]
    code = (
        "import importlib, json, sys\n"
        f"for m in {light!r}: importlib.import_module('conserve_jax.bench.' + m)\n"
        "light = sorted(x for x in ('jax', 'torch', 'transformers', 'matplotlib') if x in sys.modules)\n"
        f"for m in {heavy!r}: importlib.import_module('conserve_jax.bench.' + m)\n"
        "heavy = sorted(x for x in ('torch', 'transformers', 'llama_cpp') if x in sys.modules)\n"
        "print(json.dumps([light, heavy]))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    light_loaded, heavy_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert light_loaded == [] and heavy_loaded == []
