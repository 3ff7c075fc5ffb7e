"""The package's import structure: every module imports on its own, and no import circle exists.

A circle among module-level imports breaks whichever module is imported first; circles through
function-level imports hide until a code path runs, so the layers that the runner calls (engine,
methods, foundation) must not import the runner back at any level.
"""
import ast
import subprocess
import sys
from pathlib import Path

import bench

PACKAGE = Path(bench.__file__).resolve().parent


def bench_modules():
    """{dotted name: file} for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["bench", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_nodes(tree, module_level):
    """Import statements; with ``module_level``, only those run at import time (not in function
    bodies, not under ``if TYPE_CHECKING``)."""
    if not module_level:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def import_graph(module_level=True):
    """{module: bench modules it imports}; ``from bench.x import y`` counts ``bench.x.y`` when that is a module."""
    modules = bench_modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text()), module_level):
            if isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in candidates:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph):
    """One cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle_among_module_level_imports():
    cycle = find_cycle(import_graph(module_level=True))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_what_the_runner_calls_never_imports_the_runner():
    graph = import_graph(module_level=False)
    below = [m for m in graph if m.startswith(("bench.engine", "bench.methods")) or m == "bench.foundation"]
    offenders = sorted(m for m in below if "bench.runner" in graph[m])
    assert not offenders, f"{offenders} import bench.runner, which imports them: move the shared code down"


def test_protocols_are_a_leaf_that_imports_no_dataset_module():
    """Datasets read protocols (which cases need a label), never the reverse: a protocol file is read
    without loading any dataset module, and the two never form a circle."""
    graph = import_graph(module_level=False)   # every level, TYPE_CHECKING and function bodies included
    offenders = {m: sorted(t for t in graph[m] if t.startswith("bench.datasets"))
                 for m in graph if m == "bench.protocols" or m.startswith("bench.protocols.")}
    assert not any(offenders.values()), f"bench.protocols imports dataset modules: {offenders}"


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module is imported with no bench module loaded before it (third-party modules stay
    loaded between modules: only the package's own import order matters here)."""
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {sorted(bench_modules())!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'bench' or m.startswith('bench.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=-3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


def test_only_the_tracking_module_imports_mlflow():
    offenders = []
    for name, path in bench_modules().items():
        for node in _import_nodes(ast.parse(path.read_text()), module_level=False):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if name != "bench.tracking" and any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                offenders.append(f"{name} (line {node.lineno})")
    assert not offenders, f"MLflow is reached through bench.tracking only: {offenders}"


def test_the_method_interface_loads_no_method_until_a_lookup():
    script = ("import sys\n"
              "import bench.engine.trainer\n"
              "assert not [m for m in sys.modules if m.startswith('bench.methods.') and m != 'bench.methods.base'], "
              "sorted(sys.modules)\n"
              "from bench.methods import METHODS\n"
              "assert 'dgst' in METHODS and 'bench.methods.dgst' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE.parent,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
