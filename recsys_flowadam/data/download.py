"""Downloads of the official archives: pooch fetches and verifies, we extract safely.

pooch downloads into a temporary file next to the target and moves it into place only after
the SHA-256 matched, so a half-written or corrupted download is never taken as data. Zip
extraction is hand-written rather than pooch's ``Unzip``: we must drop the archive's top
folder (``ml-10M100K/`` -> ``<root>/ml-10m/``), refuse path-traversal and link members loudly
instead of silently rewriting their names, and move each file into place atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from ..safe_write import atomic_write
from .errors import DataError
from .paths import file_sha256, resolve_data_dir
from .registry import Download, get_info

RECORD = ".recsys-flowadam-downloads.json"  # url -> sha256 of first downloads with no published checksum


def fetch(name: str, data_dir: str | Path | None = None, *, files: Iterable[str] | None = None,
          force: bool = False) -> Path:
    """Download and extract what ``<root>/<name>/`` lacks (all of it with ``force``); returns the folder."""
    info = get_info(name)
    folder = resolve_data_dir(data_dir) / name
    required = tuple(files) if files is not None else info.files
    wanted = required if files is not None else info.files + info.optional_files
    for d in info.downloads_for(wanted):
        if force or any(not (folder / f).is_file() for f in d.provides if f in wanted):
            download(d, folder)
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: after downloading, {', '.join(missing)} is still missing in {folder}")
    return folder


def download(d: Download, folder: Path, *, timeout: float = 60.0) -> list[Path]:
    """Fetch one official archive or file into ``folder``, verify it, extract it; returns the files written."""
    import pooch  # imported here: only downloads need it

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {folder} for the download ({exc}); the data root may be read-only: "
                        f"pass --data-dir / set RECSYS_FLOWADAM_DATA to a writable folder") from exc
    known = d.sha256 or _recorded(folder).get(d.url)
    fname = PurePosixPath(d.url.split("?")[0]).name
    work = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    try:
        try:
            path = Path(pooch.retrieve(
                d.url, known_hash=f"sha256:{known}" if known else None, fname=fname, path=work,
                progressbar=sys.stderr.isatty(), downloader=pooch.HTTPDownloader(timeout=timeout),
            ))
        except ValueError as exc:  # pooch: hash mismatch (its message names both hashes)
            raise DataError(f"{d.url}: checksum mismatch, the download was discarded: {exc}") from exc
        except Exception as exc:  # requests: connection refused, truncated transfer, HTTP errors
            raise DataError(f"{d.url}: download failed ({type(exc).__name__}: {exc}); nothing was kept") from exc
        if not known:
            digest = file_sha256(path)
            _record(folder, d.url, digest)
            print(f"note: {d.url} has no published SHA-256; recorded the first download's: {digest}", file=sys.stderr)
        if d.archive:
            written = safe_extract(path, folder)
        else:
            target = folder / d.provides[0]
            os.replace(path, target)
            written = [target]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    absent = [f for f in d.provides if not (folder / f).is_file()]
    if absent:
        raise DataError(f"{d.url}: the archive does not contain {', '.join(absent)}")
    return written


def safe_extract(archive: Path, dest: Path) -> list[Path]:
    """Extract a zip into ``dest``, dropping a single common top folder; refuse unsafe members."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a valid zip archive ({exc})") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        names = []
        for m in members:
            path = PurePosixPath(m.filename.replace("\\", "/"))
            mode = m.external_attr >> 16
            if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
                raise DataError(f"{archive}: refusing unsafe member {m.filename!r} (path traversal)")
            if stat.S_ISLNK(mode):
                raise DataError(f"{archive}: refusing link member {m.filename!r}")
            names.append(path)
        if not names:
            raise DataError(f"{archive}: the archive holds no files")
        tops = {p.parts[0] for p in names}
        strip = 1 if len(tops) == 1 and all(len(p.parts) > 1 for p in names) else 0
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        written = []
        try:
            for m, path in zip(members, names):
                rel = PurePosixPath(*path.parts[strip:])
                if rel.parts and rel.parts[0] == "__MACOSX":
                    continue
                tmp = staging / Path(*rel.parts)
                tmp.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(rel)
            final = []
            for rel in written:
                target = dest / Path(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / Path(*rel.parts), target)
                final.append(target)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{archive}: damaged archive ({exc})") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final


def _recorded(folder: Path) -> dict[str, str]:
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(folder: Path, url: str, digest: str) -> None:
    data = _recorded(folder)
    data[url] = digest
    atomic_write(folder / RECORD, lambda fh: fh.write(json.dumps(data, indent=1).encode()))
