"""The package's imports follow the one-way data flow of README's "How it works":

    face (conserve_server, entrypoints, loadtest, bench) -> engine -> scheduling -> runtime
    -> kv -> models

with each folder of the package in one layer (`FOLDERS`), and every part may use the
neutral base modules (configuration, the engine contract's
types, request state, sampling parameters, tokenizer). A module never imports from a part
above its own, and no two modules import each other (directly or through a longer circle).
Imports under `if TYPE_CHECKING:` count: a type annotation that needs a module above is
the same coupling as a call into it.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# rank: a module may import only modules of equal or lower rank (base is importable by all)
LAYERS = {"base": 0, "models": 1, "kv": 2, "runtime": 3, "scheduling": 4, "engine": 5, "face": 6}
# folders -> layers: a module's layer is its folder's; modules directly in conserve_jax/ are
# the neutral base (configuration, the engine contract's types, request state, sampling,
# tokenizer), except the package root and the public alias of the gRPC client
FOLDERS = {"models": "models", "kv": "kv", "runtime": "runtime", "scheduling": "scheduling",
           "engine": "engine", "entrypoints": "face", "loadtest": "face", "bench": "face"}
FACE_AT_ROOT = {"conserve_jax", "conserve_jax.client"}


def layer_of(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] == "conserve_server":
        return "face"
    if mod in FACE_AT_ROOT:
        return "face"
    if len(parts) > 2 or parts[1] in FOLDERS:
        return FOLDERS[parts[1]]  # KeyError: a new folder must be placed in a layer here
    return "base"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "server":  # installed under its own import name (pyproject package-dir)
        parts[0] = "conserve_server"
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file)."""
    files = [p for d in ("conserve_jax", "server") for p in (ROOT / d).rglob("*.py")
             if "proto_gen" not in p.parts]
    known = {module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        mod = module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                # the longest known module that the name is, or lies inside
                while n and n not in known:
                    n = n.rsplit(".", 1)[0] if "." in n else ""
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    return graph


def test_no_import_runs_back_up_the_layers():
    graph = package_imports()
    bad = []
    for mod, deps in graph.items():
        for d in deps:
            if d == "conserve_jax":
                continue
            if LAYERS[layer_of(d)] > LAYERS[layer_of(mod)] and layer_of(d) != "base":
                bad.append(f"{mod} ({layer_of(mod)}) imports {d} ({layer_of(d)})")
            if layer_of(mod) == "base" and layer_of(d) != "base":
                bad.append(f"{mod} (base) imports {d} ({layer_of(d)})")
    assert not bad, "imports against the data flow:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    graph = package_imports()
    color: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        color[m] = 1
        for d in sorted(graph.get(m, ())):
            if d == "conserve_jax" or m == "conserve_jax":
                continue
            if color.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif not color.get(d):
                visit(d, stack + [d])
        color[m] = 2

    for m in sorted(graph):
        if not color.get(m):
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_map_covers_the_parts_readme_names():
    graph = package_imports()
    layers = {layer_of(m) for m in graph}
    assert {"base", "models", "kv", "runtime", "scheduling", "engine", "face"} <= layers
    readme = (ROOT / "README.md").read_text()
    for part in ("Scheduler", "ModelRunner", "KVCheckpointer", "request.py"):
        assert part in readme, f"README's diagram should name {part}"


def test_every_folder_is_in_a_layer_and_installed():
    """Each package folder maps to a layer, and pyproject installs every package (server/
    as conserve_server), so a new folder cannot slip past this test or the wheel."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for d in ("conserve_jax", "server")
             for p in (ROOT / d).rglob("__init__.py")}
    assert listed == found, f"pyproject packages differ from the tree: {sorted(listed ^ found)}"
    for folder in (ROOT / "conserve_jax").iterdir():
        if (folder / "__init__.py").exists() and folder.name != "proto_gen":
            assert folder.name in FOLDERS, f"conserve_jax/{folder.name}/ has no layer"


def test_batch_store_never_imports_a_face():
    graph = package_imports()
    bad = [f"{m} imports {d}" for m, deps in graph.items() if m.startswith("conserve_server.batch")
           for d in deps if d.startswith(("conserve_server.grpc_api", "conserve_server.openai_api",
                                          "conserve_server.app", "conserve_server.main"))]
    assert not bad, "\n".join(bad)
