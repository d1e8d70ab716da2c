"""Site path mapping: prefix rules that turn a path as the job's author wrote it (often on
another OS: `Z:\\shots`, `//filer/projects`, `/Volumes/projects`) into this node's path.

Owns the rule syntax (`SOURCE => TARGET`, the config key `jobtype_path_map`), matching and
applying rules to a path or to a job's data. Standard library only, outside every package so
that importing it pulls in nothing: the config model checks rules with it, job types (in the
agent, and in a task's scope where start-up time counts) apply them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ARROW = "=>"
_DRIVE = re.compile(r"^[A-Za-z]:")


def _windows_style(path: str) -> bool:
    # A drive letter, a UNC share or a backslash: the author's side was Windows, where case does
    # not matter and either slash separates.
    return bool(_DRIVE.match(path)) or path.startswith(("\\\\", "//")) or "\\" in path


def _fold(path: str, windows: bool) -> str:
    return path.replace("\\", "/").lower() if windows else path


@dataclass(frozen=True)
class PathRule:
    source: str
    target: str

    @property
    def windows(self) -> bool:
        return _windows_style(self.source)

    def match(self, path: str) -> str | None:
        """The rest of `path` after this rule's source, or None if the source is not a whole
        leading part of it (`/mnt/proj` is not a prefix of `/mnt/project2`)."""
        windows = self.windows
        src = _fold(self.source, windows).rstrip("/")
        folded = _fold(path, windows)
        if folded != src and not folded.startswith(src + "/"):
            return None
        # lower() may change a string's length (a few Unicode letters): cut the folded text then
        rest = path[len(src):] if len(folded) == len(path) else folded[len(src):]
        return rest.replace("\\", "/") if windows else rest

    def apply(self, rest: str) -> str:
        if not rest:
            return self.target
        return self.target.rstrip("/") + "/" + rest.lstrip("/")


def parse_rule(entry: str) -> PathRule:
    """One `SOURCE => TARGET`; ValueError saying what is wrong with it."""
    source, arrow, target = entry.partition(ARROW)
    source, target = source.strip(), target.strip()
    if not arrow:
        raise ValueError(f"each rule must be SOURCE {ARROW} TARGET, got {entry!r}")
    if not source or not target:
        raise ValueError(f"both sides of {ARROW} must be a path, got {entry!r}")
    if ARROW in target:
        raise ValueError(f"a rule has one {ARROW}, got {entry!r}")
    if not target.startswith("/"):
        raise ValueError(f"the target of {entry!r} must be an absolute path on this node")
    if source.rstrip("/\\") == "" and not _windows_style(source):
        raise ValueError(f"the source of {entry!r} is the whole file system: map its parts")
    return PathRule(source, target)


def parse_rules(entries: Iterable[str]) -> tuple[PathRule, ...]:
    """Rules in the order tried: the longest source first, so `Z:\\a\\b` wins over `Z:\\a`.

    Refuses two rules for one source and a target that another rule would map again: mapping
    is applied to the job's data and again by job types' `map_path`, so it must be idempotent.
    """
    rules = [parse_rule(e) for e in entries if e.strip()]
    seen: dict[str, PathRule] = {}
    for rule in rules:
        key = _fold(rule.source, rule.windows).rstrip("/")
        if key in seen:
            raise ValueError(f"two rules for {rule.source!r}: {seen[key].target!r} and "
                             f"{rule.target!r}")
        seen[key] = rule
    for rule in rules:
        for other in rules:
            if other.match(rule.target) is not None:
                raise ValueError(f"the target {rule.target!r} would be mapped again by "
                                 f"{other.source!r} {ARROW} {other.target!r}")
    return tuple(sorted(rules, key=lambda r: len(r.source.rstrip("/\\")), reverse=True))


def map_path(path: str, rules: Iterable[PathRule]) -> str:
    """`path` with the first matching rule applied; unchanged when none matches."""
    for rule in rules:
        rest = rule.match(path)
        if rest is not None:
            return rule.apply(rest)
    return path


def map_data(data: Any, rules: tuple[PathRule, ...]) -> Any:
    """A copy of job data (JSON values) with every string that a rule matches mapped; keys and
    strings no rule matches are kept as they are."""
    if not rules:
        return data
    if isinstance(data, str):
        return map_path(data, rules)
    if isinstance(data, list):
        return [map_data(v, rules) for v in data]
    if isinstance(data, dict):
        return {k: map_data(v, rules) for k, v in data.items()}
    return data
