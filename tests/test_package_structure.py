"""The package's shape, read from its source (ast): no import cycle among mat_kernels modules (imports inside
functions count), measure/ and nn/ independent, no module that only re-exports another, no file over 450 lines, no
private name of one module used by another, every public name documented in README's API table."""
import ast
import pathlib
import re

import pytest

import mat_kernels as mk

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "mat_kernels"
MAX_LINES = 450


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(name: str, path: pathlib.Path):
    """(imported mat_kernels module, the imported name or None, line) for every import, at any depth."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mat_kernels"):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("mat_kernels"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    yield (full, None, node.lineno) if full in MODULES else (base, a.name, node.lineno)


def _graph() -> dict[str, set[str]]:
    edges = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _, _ in _imports(m, p):
            if target in MODULES and target != m:
                edges[m].add(target)
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("src,dst", [("mat_kernels.measure", "mat_kernels.nn"),
                                     ("mat_kernels.nn", "mat_kernels.measure")])
def test_measure_and_nn_do_not_import_each_other(src, dst):
    bad = [(m, t) for m, ts in _graph().items() if m.startswith(src) for t in ts if t.startswith(dst)]
    assert bad == []


def test_no_module_only_re_exports():
    """A module (not a package's __init__) whose body is nothing but imports, a docstring and __all__."""
    only = []
    for m, p in MODULES.items():
        if p.name == "__init__.py":
            continue
        body = ast.parse(p.read_text()).body
        rest = [n for n in body if not isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
                and not (isinstance(n, ast.Assign) and [getattr(t, "id", None) for t in n.targets] == ["__all__"])]
        if not rest:
            only.append(m)
    assert only == []


def test_no_file_over_max_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_private_name_of_another_module():
    """``from mat_kernels.x import _name``, ``import mat_kernels._x`` or ``x._name`` on an imported mat_kernels
    module, outside the module that defines it (the compiled extension ``mat_kernels._C`` excepted: its loader)."""
    uses = []
    for m, p in MODULES.items():
        aliases = {}
        for target, name, line in _imports(m, p):
            parts = target.split(".") + ([name] if name else [])
            if any(_private(x) for x in parts) and target != "mat_kernels._C":
                uses.append(f"{p.relative_to(ROOT)}:{line}: {'.'.join(parts)}")
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    full = a.name if isinstance(node, ast.Import) else f"{node.module}.{a.name}"
                    if full in MODULES:
                        aliases[a.asname or a.name.split(".")[-1]] = full
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and aliases.get(node.value.id, m) != m):
                uses.append(f"{p.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert uses == []


def test_every_public_name_is_in_the_readme_api_table():
    text = (ROOT / "README.md").read_text()
    api = text[text.index("## API"):]
    api = api[:api.index("\n## ", 4)]
    missing = [n for n in mk.__all__ if n != "__version__" and not re.search(r"`" + re.escape(n) + r"\b", api)]
    assert missing == []
