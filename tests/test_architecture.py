"""The layout's rules, read from the code: which part of farmnode may import which.

A part is a package of farmnode/, or a top-level module (pathmap, describe; `farmnode` itself
is the root __init__, which holds only the version), with two parts named by module because
they sit at another level than the package they live in:

- daemon: farmnode.agent.main, farmnode.service's entry point, the one place that joins every
  part; it stays in agent/ until it is a console script of its own.
- bus.service: the bus modules that bind org.farmnode.Agent1 to the agent core (service,
  agent_props, errors, tasks). The rest of bus/ (interface, client, task1, views) is the
  interface as its clients see it, and imports no core.

The intended layering, each level importing only the levels below it:

1. Entry points: cli (the `farmnode` command), fleet (its many-node mode), daemon.
2. Input edges: api (HTTP; a process of its own, a D-Bus client), bus.service, jobfile (the
   node's own job queue), webhooks, health, master (the farm's master: announce, reports,
   trust). The clients' side of the bus (`bus`) sits with them: the core never imports it.
3. The agent core: agent (admission, states, recovery; the run is agent/runner.py for now).
4. The run: jobtypes (how a job becomes a command), warm (per-job interpreters).
5. What the core stands on: systemd (scopes, journald; imports no farmnode part), tasks (the
   assignment model and the store), sysinfo (host facts; imports no farmnode part).
6. Leaves: config, pathmap, describe, farmnode (the version).

ALLOWED below is that picture as it stands now, edge by edge: a new import across parts is
either in it already or a decision to write down here. CYCLE_EXCEPTIONS are the imports, module
by module, that go against it today (each closes a cycle between parts), with why each is still
there; the test fails when one is gone, so the list cannot outlive its reason.

Every import counts, including those inside functions and under TYPE_CHECKING: a lazy import
still makes the importer depend on the imported part.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "farmnode"

# Modules that are a part of their own, at another level than their package.
MODULE_PARTS = {
    "farmnode.agent.main": "daemon",
    "farmnode.bus.service": "bus.service",
    "farmnode.bus.agent_props": "bus.service",
    "farmnode.bus.errors": "bus.service",
    "farmnode.bus.tasks": "bus.service",
}

ALLOWED: dict[str, frozenset[str]] = {
    # 1. entry points
    "cli": frozenset({"daemon", "fleet", "bus", "jobfile", "tasks", "systemd", "config"}),
    "fleet": frozenset({"bus"}),
    "daemon": frozenset({"agent", "bus", "bus.service", "jobfile", "webhooks", "health",
                         "master", "sysinfo", "systemd", "tasks", "config", "farmnode"}),
    # 2. input edges
    "api": frozenset({"bus", "master", "tasks", "systemd", "config", "farmnode"}),
    "bus.service": frozenset({"agent", "bus", "jobfile", "tasks", "farmnode"}),
    "bus": frozenset({"tasks"}),
    "jobfile": frozenset({"agent", "master", "jobtypes", "tasks", "describe"}),
    "webhooks": frozenset({"agent", "master", "tasks", "config", "farmnode"}),
    "health": frozenset({"sysinfo", "systemd", "config"}),
    "master": frozenset({"sysinfo", "tasks", "config", "farmnode"}),
    # 3. the core
    "agent": frozenset({"jobtypes", "warm", "systemd", "tasks", "sysinfo", "config", "pathmap",
                        "farmnode"}),
    # 4. the run
    "jobtypes": frozenset({"warm", "tasks", "pathmap"}),
    "warm": frozenset({"systemd", "tasks", "config"}),
    # 5. what the core stands on
    "systemd": frozenset(),
    "tasks": frozenset({"config", "describe"}),
    "sysinfo": frozenset(),
    # 6. leaves
    "config": frozenset({"pathmap", "describe"}),
    "pathmap": frozenset(),
    "describe": frozenset(),
    "farmnode": frozenset(),
}

# (importing module, imported module): imports that close a cycle between parts today.
CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("farmnode.warm.manager", "farmnode.agent.accounts"):
        "a warm scope is started as the task's Account; accounts belong to the run, which is "
        "still in agent/",
    ("farmnode.warm.jobtype", "farmnode.jobtypes.base"):
        "WarmJobType is a JobType that python and remote build on: the job-type side of warm "
        "belongs with jobtypes",
    ("farmnode.fleet.fanout", "farmnode.cli.main"):
        "fleet prints tasks in `farmnode tasks`' table; the table belongs in a module both "
        "import",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part a farmnode module belongs to (the longest MODULE_PARTS prefix wins)."""
    names = module.split(".")
    for i in range(len(names), 1, -1):
        if ".".join(names[:i]) in MODULE_PARTS:
            return MODULE_PARTS[".".join(names[:i])]
    return names[1] if len(names) > 1 else "farmnode"


def is_module(dotted: str) -> bool:
    path = ROOT.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(tree: ast.AST, importer: str) -> Iterator[str]:
    """The farmnode modules `tree` imports, wherever the import statement stands."""
    package = importer if is_module(importer + ".__init__") else importer.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == "farmnode")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            if base.split(".")[0] != "farmnode":
                continue
            for alias in node.names:
                # `from farmnode.agent import core` imports the module farmnode.agent.core
                sub = f"{base}.{alias.name}"
                yield sub if is_module(sub) else base


def imports() -> dict[tuple[str, str], Path]:
    """Every (importing module, imported module) pair between two parts of farmnode."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        importer = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for imported in imported_modules(tree, importer):
            if part_of(importer) != part_of(imported):
                found.setdefault((importer, imported), path)
    return found


def part_graph(pairs: dict[tuple[str, str], Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported in pairs:
        graph.setdefault(part_of(importer), set()).add(part_of(imported))
    return graph


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as the path that closes it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


@pytest.fixture(scope="module")
def pairs() -> dict[tuple[str, str], Path]:
    return imports()


def test_every_part_is_placed_in_the_layering() -> None:
    parts = {part_of(module_name(p)) for p in ROOT.rglob("*.py")}
    assert parts == set(ALLOWED), "a new part must be placed in ALLOWED (and the docstring)"
    assert all(target in ALLOWED for targets in ALLOWED.values() for target in targets)


def test_no_import_outside_the_layering(pairs: dict[tuple[str, str], Path]) -> None:
    wrong = sorted(f"{path.relative_to(ROOT.parent)}: {importer} imports {imported} "
                   f"({part_of(importer)} -> {part_of(imported)})"
                   for (importer, imported), path in pairs.items()
                   if part_of(imported) not in ALLOWED[part_of(importer)]
                   and (importer, imported) not in CYCLE_EXCEPTIONS)
    assert not wrong, "imports the layering does not allow:\n" + "\n".join(wrong)


def test_the_parts_import_each_other_in_no_cycle(pairs: dict[tuple[str, str], Path]) -> None:
    kept = {pair: path for pair, path in pairs.items() if pair not in CYCLE_EXCEPTIONS}
    assert cycle_in(part_graph(kept)) is None, " -> ".join(cycle_in(part_graph(kept)) or [])


def test_each_cycle_exception_still_exists_and_still_closes_a_cycle(
        pairs: dict[tuple[str, str], Path]) -> None:
    for pair, why in CYCLE_EXCEPTIONS.items():
        assert pair in pairs, f"{pair[0]} no longer imports {pair[1]}: drop the exception"
        others = {p: path for p, path in pairs.items() if p != pair}
        importer, imported = (part_of(m) for m in pair)
        graph = part_graph(others)
        graph.setdefault(importer, set()).add(imported)
        assert cycle_in(graph) is not None, f"{pair} closes no cycle any more ({why})"


def test_the_core_imports_neither_its_clients_nor_the_master(
        pairs: dict[tuple[str, str], Path]) -> None:
    # Stated on its own because it is the rule most easily broken by a "quick" import: the
    # core is driven through the bus and told of the master through Protocols it declares.
    reached = part_graph(pairs).get("agent", set()) & {
        "bus", "bus.service", "api", "cli", "fleet", "master", "daemon", "jobfile", "webhooks",
        "health"}
    assert not reached, f"the agent core imports {sorted(reached)}"


def test_the_checker_sees_lazy_and_relative_imports() -> None:
    tree = ast.parse("def f():\n    from farmnode.agent import core\n"
                     "from .scope import ScopeManager\nimport farmnode.bus.interface\n")
    assert sorted(imported_modules(tree, "farmnode.systemd.manager")) == [
        "farmnode.agent.core", "farmnode.bus.interface", "farmnode.systemd.scope"]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert cycle_in(graph) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None
