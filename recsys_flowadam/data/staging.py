"""Putting downloaded files in place whole or not at all.

A download is staged in a hidden sibling of the dataset folder,
``<root>/.<name>.partial-<host>-<pid>-<random>/``, on the same file system. When the dataset
folder does not exist yet, the verified files become it by one rename. Otherwise they are
moved in file by file, with ``INCOMPLETE_MARKER`` (listing the downloads in progress) in the
folder until the last one is in place; loads refuse a folder holding it. A staging folder left
by a killed process is removed by the next download of that dataset: at once when its process
(on this host) is gone, else once nothing in it has changed for ``ABANDONED_AFTER_S``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from ..safe_write import atomic_write
from .paths import INCOMPLETE_MARKER

ABANDONED_AFTER_S = 3600.0
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def new_stage(root: Path, name: str) -> Path:
    """A fresh staging folder for dataset ``name`` in ``root``, named after this host and process."""
    return Path(tempfile.mkdtemp(prefix=f".{name}.partial-{_HOST}-{os.getpid()}-", dir=root))


def remove_abandoned(root: Path, name: str) -> list[Path]:
    """Delete staging folders of ``name`` whose download was killed; returns them."""
    pattern = re.compile(rf"\.{re.escape(name)}\.partial-([^-]+)-(\d+)-[^-]+")
    removed = []
    for path in root.glob(f".{name}.partial-*"):
        m = pattern.fullmatch(path.name)
        if m is None or not path.is_dir():
            continue
        if m.group(1) == _HOST and os.name == "posix":
            abandoned = not _alive(int(m.group(2)))
        else:
            abandoned = time.time() - _newest_mtime(path) > ABANDONED_AFTER_S
        if abandoned:
            shutil.rmtree(path, ignore_errors=True)
            print(f"note: removed an abandoned partial download {path}", file=sys.stderr)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for dirpath, _, filenames in os.walk(folder):
        for f in filenames:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
            except OSError:
                pass
    return newest


def incomplete_downloads(folder: Path) -> set[str]:
    """URLs whose files were being moved into ``folder`` when it last stopped (empty: none, or unreadable)."""
    try:
        return set(json.loads((folder / INCOMPLETE_MARKER).read_text()))
    except (OSError, ValueError, TypeError):
        return set()


def _mark(folder: Path, urls: set[str]) -> None:
    if urls:
        atomic_write(folder / INCOMPLETE_MARKER, lambda fh: fh.write(json.dumps(sorted(urls)).encode()), fsync=True)
    else:
        (folder / INCOMPLETE_MARKER).unlink(missing_ok=True)


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def install(files_dir: Path, folder: Path, url: str) -> list[Path]:
    """Move the verified files of ``files_dir`` (from ``url``) into ``folder``; returns their new paths.

    One rename when ``folder`` does not exist; else file by file under the incomplete marker.
    An OSError on the way leaves ``folder`` absent, or marked incomplete.
    """
    rels = sorted(p.relative_to(files_dir) for p in files_dir.rglob("*") if p.is_file())
    if not folder.exists():
        try:
            os.rename(files_dir, folder)
            return [folder / r for r in rels]
        except OSError:
            if not folder.exists():  # else another process created it meanwhile: move file by file
                raise
    _mark(folder, incomplete_downloads(folder) | {url})
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        _move(files_dir / rel, folder / rel)
    _mark(folder, incomplete_downloads(folder) - {url})
    return [folder / r for r in rels]


def make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, deepest first (for ``remove_if_empty``)."""
    created = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the given folders, deepest first, stopping at the first that is not empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return
