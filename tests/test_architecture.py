"""Structural rules of the package (the architecture issue): no import cycles, the model package free of
CPU kernel policy, and a MoE forward with no backend or compile branches."""

import ast
import inspect
import re
from pathlib import Path

import moelab
from moelab.model.moe import MoELayer

ROOT = Path(moelab.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = ("moelab",) + p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every moelab module `name` imports, at module level or inside functions (a lazy import is still a
    dependency: it only moves the cycle to run time)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("moelab") and t != name:
                found.add(t)
    return found


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_model_package_holds_no_cpu_kernel_policy():
    pattern = re.compile(r"onednn|\bmkl\b|measured on this|this machine|row.grid", re.IGNORECASE)
    hits = [
        f"{p.name}:{i}"
        for p in (ROOT / "model").glob("*.py")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, f"CPU kernel policy in moelab/model: {hits}"


def test_moe_forward_has_no_backend_or_compile_branches():
    src = inspect.getsource(MoELayer.forward)
    for banned in ("is_compiling", "expert_backend", "expert_impl", "type(self.experts)", "few_tokens", "device.type"):
        assert banned not in src, banned
