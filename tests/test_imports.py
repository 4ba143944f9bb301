"""No import cycles among the modules under python/ (read with ast, nothing imported)."""

import ast
import os
import subprocess
import sys

from helpers import ROOT

PYTHON = os.path.join(ROOT, "python")


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, PYTHON)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, name: str, modules: set) -> set:
    """The project modules that ``name`` (the file at ``path``) imports, anywhere in it."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # "from x import y": the module x.y when y is one, else x itself
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        # A package's own __init__ runs before any of its modules: that edge is no cycle.
        found.update(t for t in targets if t in modules and t != name and not name.startswith(t + "."))
    return found


def import_graph() -> dict:
    files = {}
    for folder, _, names in os.walk(PYTHON):
        for file in names:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                files[_module_name(path)] = path
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def find_cycle(graph: dict):
    """One cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_no_import_cycle_under_python():
    graph = import_graph()
    assert "repmlp.artifact.build" in graph and graph["repmlp.artifact.build"]  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["repmlp.artifact.contract"] = graph["repmlp.artifact.contract"] | {"repmlp.artifact.build"}
    assert find_cycle(graph) is not None


def test_the_artifact_contract_is_a_leaf():
    graph = import_graph()
    assert {m for m in graph["repmlp.artifact.contract"] if m.startswith("repmlp")} == set()
    # the builder imports the runtime lazily only (for --triton-repo), never at module level
    for folder, _, names in os.walk(os.path.join(PYTHON, "repmlp")):
        for file in (n for n in names if n.endswith(".py")):
            tree = ast.parse(open(os.path.join(folder, file), encoding="utf-8").read())
            for node in tree.body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    named = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    assert not any(n.split(".")[0] == "repmlp_rt" for n in named), (file, named)


def test_the_builder_works_without_the_runtime(tmp_path):
    """repmlp_rt blocked (as where the extension is not built): the CLI imports, --help works
    and an artifact is built."""
    out = tmp_path / "a.pt"
    code = ("import sys; sys.modules['repmlp_rt'] = None\n"
            "from repmlp.cli import main\n"
            f"sys.exit(main(['--out', {str(out)!r}]))\n")
    env = {**os.environ, "PYTHONPATH": PYTHON}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and out.is_file()
    blocked_help = "import sys; sys.modules['repmlp_rt'] = None\nfrom repmlp.cli import main\nmain(['--help'])\n"
    result = subprocess.run([sys.executable, "-c", blocked_help], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "--checkpoint" in result.stdout, result.stderr
