"""The package's shape: one home per concept, dependencies one way, a light `import honed`."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re
import subprocess
import sys
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "honed"
HEAVY = ("torch", "transformers", "trl", "peft", "accelerate")
# Where training and local inference live; the demo is a client and may import anything.
HEAVY_ALLOWED = ("learn/", "serving/engine.py", "serving/batching.py", "serving/local.py", "demo/")


def _imports() -> list[tuple[str, str]]:
    """(module path relative to the package, imported module) for every import, function-level too
    (that is where cycles hide)."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.append((rel, node.module))
            elif isinstance(node, ast.Import):
                found += [(rel, alias.name) for alias in node.names]
    return found


def _edges() -> dict[str, set[str]]:
    """Which top-level modules of honed import which others."""
    edges: dict[str, set[str]] = defaultdict(set)
    for rel, module in _imports():
        top, parts = rel.split("/")[0].removesuffix(".py"), module.split(".")
        if parts[0] == "honed" and len(parts) > 1 and parts[1] != top and top != "__init__":
            edges[top].add(parts[1])
    return edges


def _table() -> list[str]:
    """The modules named in README's "Where things live", in order."""
    section = (ROOT / "README.md").read_text().split("## Where things live", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`(honed(?:\.[a-z_]+)+)`", section)


def test_no_import_cycle_between_subpackages() -> None:
    edges = _edges()

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return a == b or any(reaches(n, b, seen | {a}) for n in edges.get(a, ()) if n not in seen)

    cycles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert cycles == []


def test_production_never_imports_the_demo() -> None:
    offenders = [
        (rel, m)
        for rel, m in _imports()
        if (m == "honed.demo" or m.startswith("honed.demo."))
        and not rel.startswith(("demo/", "cli/"))
        and rel != "__init__.py"
    ]
    assert offenders == []


def test_torch_and_trl_stay_in_learn_and_the_local_engine() -> None:
    offenders = [
        (rel, m) for rel, m in _imports() if m.split(".")[0] in HEAVY and not rel.startswith(HEAVY_ALLOWED)
    ]
    assert offenders == []


def test_import_and_instrument_load_no_alembic_torch_or_trl(tmp_path: pathlib.Path) -> None:
    """Capture in production needs none of them: `import honed` + `honed.instrument()` on an
    existing store (a new one is migrated, which is alembic's job)."""
    url = f"sqlite:///{tmp_path / 'honed.db'}"
    subprocess.run([sys.executable, "-c", f"import honed; honed.open_store({url!r})"], check=True)
    code = (
        "import sys, honed\n"
        f"honed.instrument(store={url!r})\n"
        "honed.flush()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY) | {'alembic'}!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_where_things_live_table_names_real_modules_in_dependency_order() -> None:
    """README's "Where things live": every module it names exists and imports, and each stage
    imports only stages above it in the table."""
    modules = _table()
    assert len(modules) >= 10, "the table names the module of each stage"
    for name in modules:
        importlib.import_module(name)
    covered = {m.split(".")[1] for m in modules}
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages <= covered, f"stages missing from the table: {sorted(subpackages - covered)}"

    order = list(dict.fromkeys(m.split(".")[1] for m in modules))
    upward = [
        (a, b)
        for a, targets in _edges().items()
        for b in targets
        if a in order and b in order and order.index(b) > order.index(a)
    ]
    assert upward == [], "a stage imports one below it in README's table"


def test_every_public_name_resolves_though_loaded_on_first_use() -> None:
    """`honed`'s names load their modules on first use (the store's process must not pay for
    LangChain); each still resolves, to the object its home module defines, and `dir` lists it."""
    import honed
    import honed.capture

    for package in (honed, honed.capture):
        for name in package.__all__:
            value = getattr(package, name)
            assert not isinstance(value, type(honed)), (package.__name__, name, value)  # not a module
            assert name in dir(package)
    import honed.capture.instrument  # the module shares the function's name: the function wins

    assert callable(honed.instrument) and honed.instrument is honed.capture.instrument
