"""tools/container.py's cache housekeeping: a tree a container runs from is never deleted
(a concurrent run with a newer recipe once deleted one under a booted container)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import container


def test_a_tree_in_use_is_kept_and_removed_once_free(tmp_path: Path) -> None:
    tree = tmp_path / "tree-old"
    (tree / "etc").mkdir(parents=True)
    with container.using_tree(tree):
        container._remove_unused_tree(tree)
        assert tree.is_dir()
        # another process (another test session) holds it too: still kept afterwards
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time; sys.path.insert(0, sys.argv[1]); import container, pathlib;"
             "cm = container.using_tree(pathlib.Path(sys.argv[2])); cm.__enter__();"
             "print('held', flush=True); time.sleep(60)",
             str(Path(container.__file__).parent), str(tree)],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    try:
        container._remove_unused_tree(tree)
        assert tree.is_dir()
    finally:
        holder.kill()
        holder.wait()
    container._remove_unused_tree(tree)
    assert not tree.exists() and not (tmp_path / "tree-old.lock").exists()
