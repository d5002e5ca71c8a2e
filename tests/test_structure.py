"""The structure pycomm promises (docs/collectives.md): no import cycle in pycomm (kernels/ included:
it installs as pycomm.kernels), no import inside a function in pycomm/, and every PYCOMM_*
variable read in one module."""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "pycomm"
# top-level folders installed inside the package (setup.py's PACKAGE_DIRS)
MAPPED = {"kernels": "pycomm.kernels"}


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in MAPPED:
        parts[:1] = MAPPED[parts[0]].split(".")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Modules of pycomm that `path` imports at module level (where cycles bite)."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # annotations only
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names if a.name.startswith("pycomm"))
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(pkg.split(".")[:len(pkg.split(".")) - sub.level + 1] + ([base] if base else []))
                if base.startswith("pycomm"):
                    out.add(base)
                    out.update(f"{base}.{a.name}" for a in sub.names)
    return out


def test_no_import_cycle_in_pycomm():
    paths = list(PKG.rglob("*.py")) + [p for folder in MAPPED for p in (ROOT / folder).rglob("*.py")]
    files = {_module(p): p for p in paths}
    graph = {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}
    # a package importing its own submodules is how packages work; a submodule importing its
    # package back (or a sibling that imports it) is a cycle
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if m.startswith(n + "."):
                continue  # importing a parent package: initialised before its children
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_import_inside_a_function_in_pycomm():
    bad = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        bad.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert not bad, f"imports inside functions: {bad}"


def _reads_pycomm_env(tree: ast.AST) -> bool:
    def pycomm_name(node) -> bool:
        return isinstance(node, ast.Constant) and str(node.value).startswith("PYCOMM_")

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and pycomm_name(node.slice):
            return True  # os.environ["PYCOMM_..."]
        if isinstance(node, ast.Call) and node.args and pycomm_name(node.args[0]) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) in ("get", "getenv", "pop"):
            return True  # os.environ.get("PYCOMM_..."), os.getenv(...)
    return False


def test_pycomm_settings_are_read_in_one_module():
    readers = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
               if p.name != "_settings.py" and _reads_pycomm_env(ast.parse(p.read_text()))}
    assert not readers, f"PYCOMM_* variables read outside pycomm/_settings.py: {readers}"
    settings = (PKG / "_settings.py").read_text()
    documented = set(re.findall(r"PYCOMM_[A-Z_]+", (ROOT / "README.md").read_text()))
    for name in set(re.findall(r"\"(PYCOMM_[A-Z_]+)\"", settings)):
        assert name in documented, f"{name} is read but the README does not list it"
