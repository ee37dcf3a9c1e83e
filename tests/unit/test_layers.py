"""The layers point one way and no project module imports itself back round.

The packages stack, top to bottom: coldferry (CLI) -> controller -> agent ->
driver -> transfer. Every module's imports are read with ``ast`` (nothing is
imported), wherever they stand: top level, inside functions (lazy imports),
under ``if TYPE_CHECKING:``, in ``try`` blocks. A TYPE_CHECKING import is a
dependency a reader must follow, so it counts like any other.

Which edges an import makes (module granularity, project modules only):

- ``import a.b.c`` is an edge to ``a.b.c``, the module it names. The package
  ``__init__`` modules Python also runs on the way (``a``, ``a.b``) are not
  edges: a package's ``__init__`` re-exporting its submodules would otherwise
  make every submodule that imports a sibling part of a cycle through it.
- ``from a.b import x`` is an edge to ``a.b.x`` when ``a/b/x.py`` (or
  ``a/b/x/__init__.py``) exists, and otherwise to ``a.b`` itself, the module
  that defines ``x``. Relative imports are resolved first, so in
  ``driver.libvirt.live``, ``from . import images`` is an edge to
  ``driver.libvirt.images`` only, while ``from . import LibvirtDriver`` (or
  ``from driver.libvirt import LibvirtDriver``) is an edge to the package
  ``driver.libvirt``, its ``__init__``, which is a module in its own right.
- Stdlib and third-party imports are ignored; a module importing itself is no
  edge.

A module may import its own layer or any layer below it; an edge up the stack
is a violation. A cycle is any set of modules that reach one another; each
elementary cycle is reported once, starting at its alphabetically first
module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("transfer", "driver", "agent", "controller", "coldferry")  # bottom first
MAX_CYCLES_PER_GROUP = 50  # past that, one summary line: the group needs untangling, not a list


@dataclass(frozen=True)
class Import:
    """One project module named by one import statement."""

    importer: str
    path: str  # of the importing file, relative to the root, for messages
    line: int
    target: str

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def discover(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module under the given top-level package directories, by dotted name."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a project module; None outside the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


def _from_base(node: ast.ImportFrom, module: str, is_package: bool) -> str | None:
    """The absolute module a ``from ... import`` reads from; None for a relative import past the top."""
    if not node.level:
        return node.module
    package = module.split(".") if is_package else module.split(".")[:-1]
    keep = len(package) - (node.level - 1)
    if keep < 1:
        return None
    base = ".".join(package[:keep])
    return f"{base}.{node.module}" if node.module else base


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _from_base(node, module, is_package)
        if base is None:
            return []
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    else:
        return []
    owners = (_owner(name, modules) for name in names)
    return [owner for owner in owners if owner is not None]


def imports_of(module: str, path: Path, root: Path, modules: dict[str, Path]) -> list[Import]:
    """Every project module that ``module`` imports, anywhere in its source, in line order."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    is_package = path.name == "__init__.py"
    relative = path.relative_to(root).as_posix()
    found = []
    for node in ast.walk(tree):
        for target in dict.fromkeys(_targets(node, module, is_package, modules)):
            if target != module:
                found.append(Import(module, relative, node.lineno, target))
    return sorted(found, key=lambda imp: (imp.line, imp.target))


def scan(root: Path, layers: Sequence[str] = LAYERS) -> tuple[dict[str, Path], list[Import]]:
    """The project's modules and all their imports of one another."""
    modules = discover(root, layers)
    imports = [imp for module, path in modules.items() for imp in imports_of(module, path, root, modules)]
    return modules, imports


def upward_imports(imports: Iterable[Import], layers: Sequence[str] = LAYERS) -> list[str]:
    """One line per import of a module from a higher layer."""
    rank = {layer: index for index, layer in enumerate(layers)}
    lines = []
    for imp in imports:
        low, high = imp.importer.split(".")[0], imp.target.split(".")[0]
        if rank[high] > rank[low]:
            lines.append(f"{imp.where()}: {imp.importer} imports {imp.target} "
                         f"(layer {high} is above {low})")
    return lines


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's groups of mutually reachable modules, each sorted; single modules left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, {})):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _elementary_cycles(graph: dict[str, dict[str, Import]], group: list[str], limit: int) -> list[list[str]]:
    """Cycles within one group, each once, starting from its smallest module; at most ``limit``."""
    cycles: list[list[str]] = []
    for start in group:
        allowed = {member for member in group if member >= start}
        path = [start]

        def walk(node: str) -> None:
            for nxt in sorted(graph[node]):
                if len(cycles) >= limit:
                    return
                if nxt == start:
                    cycles.append(path + [start])
                elif nxt in allowed and nxt not in path:
                    path.append(nxt)
                    walk(nxt)
                    path.pop()

        walk(start)
    return cycles


def import_cycles(imports: Iterable[Import], limit: int = MAX_CYCLES_PER_GROUP) -> list[str]:
    """One line per import cycle: the modules in order, then where each of its imports is."""
    graph: dict[str, dict[str, Import]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    lines = []
    for group in _strongly_connected(graph):
        cycles = _elementary_cycles(graph, group, limit + 1)
        for cycle in cycles[:limit]:
            hops = ", ".join(graph[a][b].where() for a, b in zip(cycle, cycle[1:]))
            lines.append(f"cycle: {' -> '.join(cycle)}  ({hops})")
        if len(cycles) > limit:
            lines.append(f"cycle group of {len(group)} modules has more than {limit} cycles: "
                         f"{', '.join(group)}")
    return lines


# The real tree.

@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    return scan(ROOT)


def test_the_whole_project_is_scanned(project):
    modules, imports = project
    assert len(modules) >= 80, sorted(modules)
    assert {module.split(".")[0] for module in modules} == set(LAYERS)
    assert len(imports) >= 100


def test_no_import_points_up_the_layers(project):
    _, imports = project
    violations = upward_imports(imports)
    if violations:
        pytest.fail(f"{len(violations)} upward import(s):\n" + "\n".join(violations), pytrace=False)


def test_no_import_cycles(project):
    _, imports = project
    cycles = import_cycles(imports)
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles), pytrace=False)


# The checker itself, on small trees.

def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for layer in LAYERS:
        (root / layer).mkdir(exist_ok=True)
        (root / layer / "__init__.py").touch()
    return root


def check(root: Path) -> tuple[list[str], list[str]]:
    _, imports = scan(root)
    return upward_imports(imports), import_cycles(imports)


def test_a_clean_tree_passes(tmp_path):
    root = write_tree(tmp_path, {
        "transfer/units.py": "import os\n",
        "driver/base.py": "from transfer.units import GiB\nimport transfer\n",
        "driver/lib/__init__.py": "from .driver import Driver\n",
        "driver/lib/driver.py": "from . import live\nfrom ..base import X\n",
        "driver/lib/live.py": "from . import images\nimport libvirt\n",
        "driver/lib/images.py": "import subprocess\n",
        "agent/app.py": "from driver.lib import Driver\nfrom transfer import units\n",
        "coldferry/cli.py": "def main():\n    import controller.api\n",
        "controller/api.py": "from agent import app\n",
    })
    assert check(root) == ([], [])


def test_an_upward_import_is_named_with_its_line(tmp_path):
    root = write_tree(tmp_path, {
        "transfer/sender.py": "import os\n\nfrom driver import model\n",
        "driver/model.py": "def f():\n    from agent.jobs import Job\n",
        "agent/jobs.py": "",
    })
    upward, _ = check(root)
    assert upward == [
        "transfer/sender.py:3: transfer.sender imports driver.model (layer driver is above transfer)",
        "driver/model.py:2: driver.model imports agent.jobs (layer agent is above driver)",
    ]


def test_a_cycle_through_a_type_checking_import_is_named_in_order(tmp_path):
    root = write_tree(tmp_path, {
        "driver/lib/__init__.py": "from .driver import Driver\n",
        "driver/lib/driver.py": "from . import live, images\n",
        "driver/lib/live.py": ("from typing import TYPE_CHECKING\nfrom . import images\n"
                               "if TYPE_CHECKING:\n    from .driver import Driver\n"),
        "driver/lib/images.py": "",
    })
    upward, cycles = check(root)
    assert upward == []
    assert cycles == [
        "cycle: driver.lib.driver -> driver.lib.live -> driver.lib.driver  "
        "(driver/lib/driver.py:1, driver/lib/live.py:4)",
    ]


def test_importing_a_name_from_the_own_package_counts_as_an_edge_to_its_init(tmp_path):
    root = write_tree(tmp_path, {
        "driver/lib/__init__.py": "from .driver import Driver\n",
        "driver/lib/driver.py": "def f():\n    from . import Driver as Again\n",
    })
    _, cycles = check(root)
    assert cycles == [
        "cycle: driver.lib -> driver.lib.driver -> driver.lib  (driver/lib/__init__.py:1, driver/lib/driver.py:2)",
    ]


def test_relative_imports_resolve_to_submodules_and_packages(tmp_path):
    root = write_tree(tmp_path, {
        "driver/errors.py": "",
        "driver/lib/__init__.py": "from . import images\nfrom .images import qemu\n",
        "driver/lib/images.py": "from ..errors import ImageError\nfrom .. import errors, VERSION\n",
        "driver/lib/sub/__init__.py": "",
        "driver/lib/sub/deep.py": "from ...lib import images\nfrom ... import lib\nimport driver.lib.sub\n",
    })
    _, imports = scan(root)
    edges = {(imp.importer, imp.target) for imp in imports}
    assert edges == {
        ("driver.lib", "driver.lib.images"),
        ("driver.lib.images", "driver.errors"),
        ("driver.lib.images", "driver"),
        ("driver.lib.sub.deep", "driver.lib.images"),
        ("driver.lib.sub.deep", "driver.lib"),
        ("driver.lib.sub.deep", "driver.lib.sub"),
    }
