"""Downloads of the official archives (``recsys-flowadam data fetch NAME``): fetch, verify, install.

pooch fetches into a staging folder beside the dataset folder and checks the SHA-256; the
archive is extracted there (``archive.safe_extract``), the files it must provide are checked,
and only then are they put in place (``staging.install``: one rename, or moves under an
incomplete marker that loads refuse). Nothing is recorded or kept before the whole download is
in place: a failure at any step removes the staging folder and any folder this call created.
Where no SHA-256 is published, the first complete download's is recorded (trust on first use)
in ``<folder>/.recsys-flowadam-downloads.json`` and later downloads must match it.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import urlsplit

from ..safe_write import atomic_write
from .archive import safe_extract
from .errors import DataError
from .guidance import manual_steps
from .paths import INCOMPLETE_MARKER, OFFLINE_ENV, dataset_folder, file_sha256, offline_by_default
from .registry import Download, get_info
from .staging import incomplete_downloads, install, make_dirs, new_stage, remove_abandoned, remove_if_empty

__all__ = ["RECORD", "download", "fetch", "safe_extract"]

RECORD = ".recsys-flowadam-downloads.json"  # url -> sha256 of first downloads with no published checksum


def fetch(name: str, data_dir: str | Path | None = None, *, files: Iterable[str] | None = None,
          force: bool = False) -> Path:
    """Download and install what ``<root>/<name>/`` lacks (all of it with ``force``); returns the folder.

    Also redoes a download that stopped while moving its files in. Refused under
    ``$RECSYS_FLOWADAM_OFFLINE``. A failure is a one-line reason followed by how to do it by hand.
    """
    info = get_info(name)
    folder = dataset_folder(name, data_dir)
    required = tuple(files) if files is not None else info.files
    wanted = required if files is not None else info.files + info.optional_files
    pending = incomplete_downloads(folder)
    todo = [d for d in info.downloads_for(wanted)
            if force or d.url in pending or any(not (folder / f).is_file() for f in d.provides if f in wanted)]
    if todo and offline_by_default():
        raise DataError("\n".join([f"{name}: downloads are off (${OFFLINE_ENV} is set)",
                                   *manual_steps(info, folder, wanted)]))
    for d in todo:
        try:
            download(d, folder)
        except DataError as exc:
            raise DataError("\n".join([f"{name}: {exc}", *manual_steps(info, folder, d.provides)])) from exc
    missing = [f for f in required if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name}: after downloading, {', '.join(missing)} is still missing in {folder}")
    return folder


def download(d: Download, folder: Path, *, timeout: float = 60.0) -> list[Path]:
    """Fetch one official archive or file, verify it, and install its files in ``folder``; returns them."""
    known = d.sha256 or _recorded(folder).get(d.url)
    created: list[Path] = []
    try:
        created = make_dirs(folder.parent)
        remove_abandoned(folder.parent, folder.name)
        stage = new_stage(folder.parent, folder.name)
    except OSError as exc:
        remove_if_empty(created)
        raise DataError(f"cannot write in {folder.parent} for the download ({exc}); the data root may be "
                        f"read-only: pass --data-dir / set RECSYS_FLOWADAM_DATA to a writable folder") from exc
    done = False
    try:
        archive = _retrieve(d, known, stage / "download", timeout)
        digest = known or file_sha256(archive)
        files_dir = stage / "files"
        if d.archive:
            safe_extract(archive, files_dir)
        else:
            files_dir.mkdir()
            archive.rename(files_dir / d.provides[0])
        absent = [f for f in d.provides if not (files_dir / f).is_file()]
        if absent:
            raise DataError(f"{d.url}: the archive does not contain {', '.join(absent)}; nothing was kept")
        try:
            written = install(files_dir, folder, d.url)
        except OSError as exc:
            kept = ("it is marked incomplete: loads refuse it until `data fetch` completes it"
                    if (folder / INCOMPLETE_MARKER).exists() else "nothing was kept")
            raise DataError(f"{d.url}: could not move the files into {folder} ({exc}); {kept}") from exc
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done:
            remove_if_empty(created)
    if not known:
        _record(folder, d.url, digest)
        print(f"note: {d.url} has no published SHA-256; recorded this download's: {digest}", file=sys.stderr)
    return written


def _retrieve(d: Download, known: str | None, work: Path, timeout: float) -> Path:
    """pooch.retrieve into ``work``, its errors turned into one-line DataErrors."""
    import pooch  # imported here: only downloads need it
    import requests

    work.mkdir()
    try:
        return Path(pooch.retrieve(
            d.url, known_hash=f"sha256:{known}" if known else None, fname=PurePosixPath(urlsplit(d.url).path).name,
            path=work, progressbar=sys.stderr.isatty(), downloader=pooch.HTTPDownloader(timeout=timeout),
        ))
    except requests.RequestException as exc:
        raise DataError(f"{d.url}: download failed: {network_reason(exc, d.url, timeout)}; nothing was kept") from exc
    except ValueError as exc:  # pooch: hash mismatch (its message names both hashes)
        raise DataError(f"{d.url}: checksum mismatch, the download was discarded: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{d.url}: download failed: {network_reason(exc, d.url, timeout)}; nothing was kept") from exc


def network_reason(exc: BaseException, url: str, timeout: float) -> str:
    """A short reason for a failed transfer (requests nests the real cause three levels deep)."""
    import requests

    host = urlsplit(url).hostname or url
    response = getattr(exc, "response", None)
    if isinstance(exc, requests.HTTPError) and response is not None:
        return f"HTTP {response.status_code} {response.reason} from {host}"
    cause = _innermost(exc)
    if isinstance(exc, requests.Timeout) or isinstance(cause, TimeoutError):
        return f"no answer from {host} within {timeout:g} s"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve {host} (no network connection or DNS?)"
    if isinstance(cause, ConnectionRefusedError):
        return f"{host} refused the connection"
    text = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {text[:200]}"


def _innermost(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while True:
        nested = [getattr(exc, "reason", None), exc.__cause__, exc.__context__, *exc.args]
        nxt = next((e for e in nested if isinstance(e, BaseException) and id(e) not in seen), None)
        if nxt is None:
            return exc
        seen.add(id(nxt))
        exc = nxt


def _recorded(folder: Path) -> dict[str, str]:
    path = folder / RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise DataError(f"{path}: unreadable download record ({exc}); delete it to trust the next download") from exc


def _record(folder: Path, url: str, digest: str) -> None:
    data = _recorded(folder)
    data[url] = digest
    atomic_write(folder / RECORD, lambda fh: fh.write(json.dumps(data, indent=1).encode()))
