"""Every program the build, the tools and the tests run is installed by the project's set-up.

A fresh machine has only what `make apt`, the venv and the cached trees put there
(tools/toolcheck.py says which program comes from where); a tool that only the developer's
machine had would pass here and fail there, as scdoc did while PKG_APT was expanded empty.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import container  # noqa: E402
import pyfarm_master  # noqa: E402
import toolcheck  # noqa: E402
from toolcheck import HOST, PYFARM, TREE, Use  # noqa: E402

MAKEFILE = (REPO / "Makefile").read_text()


def flagged(uses: set[Use], makefile: str = MAKEFILE) -> set[tuple[str, str]]:
    return {(u.program, u.place) for u in toolcheck.missing(uses, toolcheck.provided(makefile))}


def test_every_program_run_is_installed_by_the_set_up() -> None:
    uses = toolcheck.all_uses()
    have = toolcheck.provided()
    missing = toolcheck.missing(uses, have)
    assert not missing, "nothing installs these (add the package to the Makefile's " \
        "APT_PACKAGES, the tree's PACKAGES or pyproject, and its line to tools/toolcheck.py):" \
        + "".join(f"\n  {u}" for u in sorted(missing, key=str))


def test_the_reader_sees_the_tools_of_each_place() -> None:
    # Without this a reader that found nothing would pass the test above.
    seen = {(u.program, u.place) for u in toolcheck.all_uses()}
    expected = {
        ("scdoc", HOST), ("dpkg-shlibdeps", HOST), ("/usr/lib/rpm/elfdeps", HOST),  # build.py
        ("lintian", HOST), ("rpmlint", HOST), (".venv/bin/ruff", HOST),  # Makefile recipes
        ("debootstrap", HOST), ("systemd-nspawn", HOST), ("qemu-system-x86_64", HOST),
        ("nfpm", HOST),  # shutil.which
        ("rpm", HOST), ("ip", HOST),  # the tests' own subprocess calls
        ("busctl", TREE), ("systemd-analyze", TREE), ("ps", TREE),  # Container.run, BUSCTL
        ("useradd", TREE), ("awk", TREE),  # scripts for sh -c and Container.sh
        ("deb-systemd-helper", TREE), ("systemd-sysusers", TREE),  # maintainer scripts
        ("/opt/farmnode/bin/farmnode", TREE),  # a unit's ExecStart
        ("systemd-cat", TREE), ("/usr/local/bin/fn-probe", TREE),  # through systemd-run
        ("python2.7", PYFARM), ("redis-server", PYFARM),  # virtualenv -p, the _start wrapper
    }
    assert expected <= seen, sorted(expected - seen)


def with_sources(rel: str, text: str) -> set[Use]:
    return toolcheck.python_uses({**toolcheck.python_sources(), rel: textwrap.dedent(text)})


def test_a_new_tool_without_its_package_is_flagged() -> None:
    uses = with_sources("tests/system/test_new.py", """
        import shutil, subprocess
        from container import Container
        JQ = ["jq", "-r"]

        def test_x(ct: Container) -> None:
            subprocess.run(["frobnicate", "--all"], check=True)
            shutil.which("firefox")
            ct.run([*JQ, ".id"])
            ct.sh("xmllint --noout /etc/x.xml && systemctl daemon-reload")
            subprocess.run(["systemd-nspawn", "-q", "-D", "/t", "--", "fakeroot", "ls"])
        """)
    bad = flagged(uses)
    assert {("frobnicate", HOST), ("firefox", HOST), ("jq", TREE),
            ("xmllint", TREE)} <= bad
    # nspawn from a module toolcheck does not know: into which tree is not known either
    assert any(prog == "fakeroot" and "NSPAWN_INTO" in place for prog, place in bad)
    # what the set-up does install is not flagged alongside
    assert not {p for p in bad if p[0] in ("systemctl", "systemd-nspawn", "ls")}


def test_a_new_tool_in_the_makefile_or_the_pyfarm_tree_is_flagged() -> None:
    makefile = MAKEFILE + "\nnew: setup\n\tpandoc README.md -o x.html && $(VENV)/bin/sphinx x\n"
    uses = set(toolcheck.makefile_uses(makefile))
    assert {("pandoc", HOST), (".venv/bin/sphinx", HOST)} <= flagged(uses, makefile)
    source = (REPO / "tools/pyfarm_master.py").read_text().replace(
        '"-p", "python2.7"', '"-p", "python3.9"')
    uses = with_sources("tools/pyfarm_master.py", source)
    assert ("python3.9", PYFARM) in flagged(uses)


def test_a_package_make_apt_leaves_out_is_flagged() -> None:
    # The bug a fresh machine found: PKG_APT defined after APT_PACKAGES := expanded it empty.
    lines = MAKEFILE.splitlines(keepends=True)
    pkg = next(i for i, line in enumerate(lines) if line.startswith("PKG_APT :="))
    apt = next(i for i, line in enumerate(lines) if line.startswith("APT_PACKAGES :="))
    assert pkg < apt
    broken = "".join(lines[:pkg] + lines[pkg + 1:apt + 2] + [lines[pkg]] + lines[apt + 2:])
    assert "scdoc" not in toolcheck.apt_packages(broken)
    bad = flagged(toolcheck.all_uses(), broken)
    assert {("scdoc", HOST), ("lintian", HOST), ("rpm", HOST), ("rpmlint", HOST)} <= bad


def _on_path(root: Path, program: str) -> bool:
    if program.startswith("/"):
        return (root / program.lstrip("/")).exists() or (root / "usr" / program.lstrip(
            "/")).exists()
    return any((root / d / program).exists() for d in ("usr/bin", "usr/sbin", "bin", "sbin"))


@pytest.mark.parametrize("place", [TREE, PYFARM])
def test_the_tables_match_the_cached_trees(place: str) -> None:
    """toolcheck's knowledge of what a tree's packages bring, checked on the tree itself."""
    if place == TREE:
        root = container.CACHE_ROOT / f"tree-{container.recipe_hash()}"
        tables = {**toolcheck.TREE_APT, **{p: w for p, w in toolcheck.TREE_BASE.items()
                                          if ":" in w}}
    else:
        root = pyfarm_master.CACHE_ROOT / f"pyfarm-{pyfarm_master.recipe_hash()}"
        tables = {**toolcheck.PYFARM_APT, **toolcheck.PYFARM_BASE}
    if not (root / ".farmnode-tree-complete").exists():
        pytest.skip(f"{root} not built (tools/{'container' if place == TREE else 'pyfarm_master'}"
                    ".py build)")
    absent = sorted(p for p in tables if not _on_path(root, p))
    assert not absent, f"not in {root}: {absent}"
