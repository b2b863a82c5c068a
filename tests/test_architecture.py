"""The package's layering: no import cycles (lazy imports count), arrows only downward, small files."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deltatune"

# Who may import whom, by top-level part of the package (a module's own part is always allowed).
# Downward only: cli/demo -> train, serve -> fast/quant/formats -> methods -> adapters; kernels import nothing of ours.
ALLOWED = {
    "adapters": set(),
    "methods": {"adapters"},
    "formats": {"adapters", "methods"},
    "kernels": set(),
    "quant": {"adapters", "kernels"},
    "fast": {"kernels"},
    "hub": {"assets"},
    "dist": set(),  # data-parallel wrapping (FSDP2, DDP): torch.distributed only
    "train": {"__init__", "adapters", "methods", "formats", "quant", "fast", "kernels", "hub", "assets", "dist"},
    "serve": {"__init__", "adapters", "methods", "formats", "quant", "fast", "kernels", "hub", "assets"},
    "benchmark": {"__init__", "adapters", "methods", "formats", "quant", "fast", "kernels", "hub", "train"},
    "demo": {"__init__", "train", "hub", "assets", "adapters", "methods", "formats"},
    "cli": {"__init__", "train", "hub", "assets", "adapters", "methods", "formats", "demo", "benchmark", "quant",
            "serve", "cli_args"},
    "cli_args": set(),  # the flag parsing shared by the commands: jsonargparse only
    "assets": set(),
    "__init__": {"adapters", "methods", "formats"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = f
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere (inside functions too; not under TYPE_CHECKING)."""
    edges = {}
    for name, f in mods.items():
        tree = ast.parse(f.read_text())
        skip = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                for b in n.body for x in ast.walk(b)}
        targets = set()
        for n in ast.walk(tree):
            if id(n) in skip or not isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(n, ast.Import):
                found = [a.name for a in n.names]
            else:
                base = name.split(".")
                if n.level:
                    base = base[: len(base) - n.level + (1 if f.name == "__init__.py" else 0)]
                    module = ".".join(base + ([n.module] if n.module else []))
                else:
                    module = n.module or ""
                found = [module] + [f"{module}.{a.name}" for a in n.names]
            for t in found:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package's own __init__ imported from inside it is no edge; the facade (deltatune) is one
                if t and t != name and t.startswith("deltatune") and (t == "deltatune" or not name.startswith(t + ".")):
                    targets.add(t)
        edges[name] = targets
    return edges


def test_no_import_cycles():
    mods = _modules()
    edges = _imports(mods)
    state, cycles = {}, []

    def visit(v, path):
        state[v] = "open"
        for w in sorted(edges[v]):
            if state.get(w) == "open":
                cycles.append(path[path.index(w):] + [w])
            elif w not in state:
                visit(w, path + [w])
        state[v] = "done"

    for v in sorted(mods):
        if v not in state:
            visit(v, [v])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _part(module: str) -> str:
    """The top-level part of the package a module belongs to ("__init__" for the facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_arrows_point_down():
    edges = _imports(_modules())
    wrong = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets
                   if _part(a) != _part(b) and _part(b) not in ALLOWED.get(_part(a), set()))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 520, f"{path.relative_to(PACKAGE)} has {lines} lines: usually two concepts in one file"
