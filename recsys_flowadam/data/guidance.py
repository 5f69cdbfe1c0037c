"""What to tell a user whose dataset is not where it was looked for.

Every message names the data root that was searched and where that root came from (a
forgotten ``export`` shows as "the default"), the ways to point at data (``--data-dir``,
``$RECSYS_FLOWADAM_DATA``, ``recsys-flowadam data fetch NAME``) and how to install the files by
hand; it also says when the root looks like a dataset's own folder rather than a data root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .paths import DATA_ENV, data_root_origin, resolve_data_dir
from .registry import DATASETS, DatasetEntry


def manual_steps(info: DatasetEntry, folder: Path, files: Iterable[str]) -> list[str]:
    """One line per official download that provides ``files``: URL, checksum, where its files go."""
    lines = []
    for d in info.downloads_for(tuple(files)):
        digest = f"sha256 {d.sha256}" if d.sha256 else "no published sha256"
        if d.archive:
            lines.append(f"  by hand (offline): download {d.url} ({digest}), unzip it and put the files of its "
                         f"top folder ({', '.join(d.provides)}) into {folder}/")
        else:
            lines.append(f"  by hand (offline): download {d.url} ({digest}) and save it as {folder / d.provides[0]}")
    return lines


def missing_message(info: DatasetEntry, data_dir: str | Path | None, folder: Path, missing: list[str]) -> str:
    """The error for a dataset whose required files are not all in ``folder``: the root searched
    and its origin, the three ways to point at data, and how to install the files by hand."""
    root = resolve_data_dir(data_dir)
    hint = root_hint(root, info.name)
    target = hint[1] if hint else root  # the data root the dataset should go into
    lines = [f"{info.name}: not found: missing {', '.join(str(folder / m) for m in missing)}",
             f"  data root searched: {root} ({data_root_origin(data_dir)})",
             *([f"  {hint[0]}"] if hint else []),
             f"  point at a folder holding {info.name}/ with --data-dir DIR or `export {DATA_ENV}=DIR`,",
             f"  or download it (loading never downloads): recsys-flowadam data fetch {info.name} --data-dir {target}"]
    return "\n".join(lines + manual_steps(info, folder if target == root else target / info.name, missing))


def incomplete_message(info: DatasetEntry, data_dir: str | Path | None, folder: Path) -> str:
    """The error for a folder whose last download stopped while moving files into it."""
    root = resolve_data_dir(data_dir)
    return (f"{info.name}: {folder} is incomplete: an earlier download stopped while moving its files in. "
            f"Run `recsys-flowadam data fetch {info.name} --force --data-dir {root}` to complete it.")


def root_hint(root: Path, wanted: str) -> tuple[str, Path] | None:
    """(note, the data root to use) when ``root`` looks like a dataset's own folder rather than
    the folder holding dataset folders: it is named after a dataset, or holds one's files."""
    for entry in DATASETS.values():
        if root.name == entry.name and entry.name != wanted:  # (wanted: dataset_folder took root as its folder)
            return (f"note: {root} looks like the folder of dataset {entry.name}, not a data root; "
                    f"the data root is the folder above it: --data-dir {root.parent}"), root.parent
        if root.name != entry.name and all((root / f).is_file() for f in entry.files):
            return (f"note: {root} itself holds the files of {entry.name}; a data root holds one folder per "
                    f"dataset: move them into {root / entry.name}/"), root
    return None
