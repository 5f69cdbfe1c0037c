"""Safe zip extraction for the official archives.

Hand-written rather than pooch's ``Unzip``: we must drop the archive's top folder
(``ml-10M100K/`` -> ``<root>/ml-10m/``) and refuse path-traversal and link members loudly
instead of silently rewriting their names.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .errors import DataError


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip into ``dest`` (created if needed), dropping a single common top folder.

    Every member is checked before anything is written: absolute or ``..`` paths and symbolic
    links are refused. A damaged member stops with a DataError and may leave some files in
    ``dest``, so extract into a fresh staging folder and discard it on error (``download`` does).
    """
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc})") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        names = [_checked_name(archive, m) for m in members]
        if not names:
            raise DataError(f"{archive}: the archive holds no files")
        tops = {p.parts[0] for p in names}
        strip = 1 if len(tops) == 1 and all(len(p.parts) > 1 for p in names) else 0
        written = []
        try:
            for m, path in zip(members, names):
                rel = PurePosixPath(*path.parts[strip:])
                if rel.parts and rel.parts[0] == "__MACOSX":
                    continue
                target = dest / Path(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(target)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{archive}: damaged archive ({exc})") from exc
    return written


def _checked_name(archive: Path, member: zipfile.ZipInfo) -> PurePosixPath:
    path = PurePosixPath(member.filename.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DataError(f"{archive}: refusing unsafe member {member.filename!r} (path traversal)")
    if stat.S_ISLNK(member.external_attr >> 16):
        raise DataError(f"{archive}: refusing link member {member.filename!r}")
    return path
