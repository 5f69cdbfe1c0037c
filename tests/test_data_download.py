"""Downloads against a local HTTP server on 127.0.0.1: good, corrupted, truncated, path traversal,
killed mid-transfer, failing mid-install; and that nothing is kept or recorded unless complete."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile

import pytest

from recsys_flowadam.data import DataError, load_dataset, registry
from recsys_flowadam.data.download import RECORD, download, fetch, safe_extract
from recsys_flowadam.data.paths import INCOMPLETE_MARKER
from recsys_flowadam.data.registry import Download

U_DATA = "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{880000000 + u * 7 + i}\n" for u in range(1, 6) for i in range(1, 5))


def zip_bytes(members: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    return buf.getvalue()


GOOD = zip_bytes({"ml-100k/u.data": U_DATA, "ml-100k/u.item": "1|One (1990)|x\n", "ml-100k/README": "hi\n"})
EVIL = zip_bytes({"ml-100k/u.data": U_DATA, "ml-100k/../../evil.txt": "pwned\n"})
NO_ITEMS = zip_bytes({"ml-100k/u.data": U_DATA})  # a valid zip that lacks a file the dataset needs
BIG = zip_bytes({"ml-100k/u.data": U_DATA * 4000})  # large enough to span several transfer chunks
RELEASE = threading.Event()  # lets the slow handler finish at teardown


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    files = {"/good.zip": GOOD, "/evil.zip": EVIL, "/u.data": U_DATA.encode(), "/rolling.zip": NO_ITEMS}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path == "/slow.zip":  # send half, then stall until the test ends
            self.send_response(200)
            self.send_header("Content-Length", str(len(BIG)))
            self.end_headers()
            self.wfile.write(BIG[: len(BIG) // 2])
            self.wfile.flush()
            RELEASE.wait(60)
            self.close_connection = True
            return
        if self.path == "/truncated.zip":  # announce the whole archive, send half, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(GOOD)))
            self.end_headers()
            self.wfile.write(GOOD[: len(GOOD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    RELEASE.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RECSYS_FLOWADAM_OFFLINE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only: never through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def leftovers(folder):
    """Anything besides the expected files: temp files, partial downloads (in the folder or beside it)."""
    return sorted(p.name for where in (folder, folder.parent) for p in where.iterdir() if p.name.startswith("."))


def test_good_archive_is_verified_and_extracted(server, tmp_path):
    folder = tmp_path / "ml-100k"
    written = download(Download(f"{server}/good.zip", sha(GOOD), ("u.data", "u.item")), folder)
    assert sorted(p.name for p in written) == ["README", "u.data", "u.item"]
    assert (folder / "u.data").read_text() == U_DATA  # top folder "ml-100k/" dropped
    assert leftovers(folder) == []


def test_corrupted_download_names_both_hashes_and_keeps_nothing(server, tmp_path):
    folder = tmp_path / "ml-100k"
    wrong = "0" * 64
    with pytest.raises(DataError, match="checksum mismatch") as err:
        download(Download(f"{server}/good.zip", wrong, ("u.data",)), folder)
    assert wrong in str(err.value) and sha(GOOD) in str(err.value)
    assert list(tmp_path.iterdir()) == []  # not even an empty folder


def test_truncated_transfer_is_an_error(server, tmp_path):
    folder = tmp_path / "ml-100k"
    with pytest.raises(DataError, match="download failed.*IncompleteRead"):
        download(Download(f"{server}/truncated.zip", sha(GOOD), ("u.data",)), folder)
    assert list(tmp_path.iterdir()) == []


def test_path_traversal_member_is_refused(server, tmp_path):
    folder = tmp_path / "root" / "ml-100k"
    with pytest.raises(DataError, match=r"unsafe member 'ml-100k/\.\./\.\./evil\.txt'"):
        download(Download(f"{server}/evil.zip", sha(EVIL), ("u.data",)), folder)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "root" / "evil.txt").exists()
    assert list(tmp_path.iterdir()) == []  # the root this call created is gone again


def test_safe_extract_refuses_absolute_paths(tmp_path):
    archive = tmp_path / "abs.zip"
    archive.write_bytes(zip_bytes({"/etc/evil": "x"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="unsafe member"):
        safe_extract(archive, tmp_path / "out")


def test_no_published_hash_records_the_first_download(server, tmp_path):
    folder = tmp_path / "x"
    download(Download(f"{server}/u.data", None, ("u.data",), archive=False), folder)
    assert (folder / "u.data").read_text() == U_DATA
    import json
    assert json.loads((folder / ".recsys-flowadam-downloads.json").read_text()) == {
        f"{server}/u.data": sha(U_DATA.encode())}



def fake_ml100k(monkeypatch, url: str, sha256: str | None) -> None:
    """Point the registry's ml-100k at the local server."""
    info = dataclasses.replace(registry.DATASETS["ml-100k"], downloads=(Download(url, sha256, ("u.data", "u.item")),))
    monkeypatch.setitem(registry.DATASETS, "ml-100k", info)


def test_loading_never_downloads_and_names_the_root_and_the_ways_to_get_data(server, tmp_path, monkeypatch):
    fake_ml100k(monkeypatch, f"{server}/good.zip", sha(GOOD))
    with pytest.raises(DataError) as err:
        load_dataset("ml-100k", tmp_path)
    msg = str(err.value)
    assert f"data root searched: {tmp_path} (from --data-dir)" in msg
    assert "--data-dir DIR" in msg and "RECSYS_FLOWADAM_DATA=DIR" in msg
    assert f"recsys-flowadam data fetch ml-100k --data-dir {tmp_path}" in msg
    assert f"{server}/good.zip" in msg and "Traceback" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing downloaded, no empty ml-100k/ left behind
    assert fetch("ml-100k", tmp_path) == tmp_path / "ml-100k"
    r = load_dataset("ml-100k", tmp_path)
    assert r.n_ratings == 20 and r.item_titles[0] == "One (1990)"
    assert fetch("ml-100k", tmp_path) == tmp_path / "ml-100k"  # present: nothing to do
    assert leftovers(tmp_path / "ml-100k") == []


def test_root_that_is_the_dataset_folder_is_used_as_that_folder(server, tmp_path, monkeypatch):
    fake_ml100k(monkeypatch, f"{server}/good.zip", sha(GOOD))
    folder = tmp_path / "ml-100k"
    assert fetch("ml-100k", folder) == folder  # not ml-100k/ml-100k
    assert (folder / "u.data").is_file() and not (folder / "ml-100k").exists()
    assert load_dataset("ml-100k", folder).n_ratings == 20
    with pytest.raises(DataError, match=rf"{folder} looks like the folder of dataset ml-100k, not a data root; "
                                        rf"the data root is the folder above it: --data-dir {tmp_path}"):
        load_dataset("jester-4", folder)


def test_network_failure_is_one_line_then_how_to_do_it_by_hand(tmp_path, monkeypatch):
    fake_ml100k(monkeypatch, "http://127.0.0.1:1/ml-100k.zip", None)  # port 1: connection refused
    root = tmp_path / "new-root"
    with pytest.raises(DataError) as err:
        fetch("ml-100k", root)
    first, *rest = str(err.value).splitlines()
    assert first == ("ml-100k: http://127.0.0.1:1/ml-100k.zip: download failed: 127.0.0.1 refused the connection; "
                     "nothing was kept")
    assert rest and all(line.startswith("  by hand (offline): download http://127.0.0.1:1/ml-100k.zip") for line in rest)
    assert not root.exists()  # the root this call created is removed again


def test_offline_switch_forbids_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("RECSYS_FLOWADAM_OFFLINE", "1")
    with pytest.raises(DataError, match=r"jester-4: downloads are off \(\$RECSYS_FLOWADAM_OFFLINE is set\)"):
        fetch("jester-4", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_first_download_records_nothing(server, tmp_path):
    """No published hash: a first archive that fails the extraction checks must not be trusted."""
    url = f"{server}/rolling.zip"
    folder = tmp_path / "ml-100k"
    Handler.files["/rolling.zip"] = NO_ITEMS
    with pytest.raises(DataError, match="does not contain u.item; nothing was kept"):
        download(Download(url, None, ("u.data", "u.item")), folder)
    assert list(tmp_path.iterdir()) == []  # no folder, no record
    Handler.files["/rolling.zip"] = GOOD  # the server now has the right archive
    download(Download(url, None, ("u.data", "u.item")), folder)
    assert json.loads((folder / RECORD).read_text()) == {url: sha(GOOD)}
    Handler.files["/rolling.zip"] = NO_ITEMS


def test_io_error_while_moving_files_in_marks_the_folder_incomplete(server, tmp_path, monkeypatch, capsys):
    fake_ml100k(monkeypatch, f"{server}/good.zip", sha(GOOD))
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")  # an existing folder: files are moved in one by one
    real_replace = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if str(dst) == str(folder / "u.item"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(DataError, match=r"could not move the files into .*No space left on device"):
        fetch("ml-100k", tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / "u.data").is_file() and (folder / INCOMPLETE_MARKER).is_file()  # half in place, and marked
    with pytest.raises(DataError, match=r"is incomplete: .* data fetch ml-100k --force"):
        load_dataset("ml-100k", tmp_path)
    from recsys_flowadam.cli import main
    assert main(["data", "list", "--data-dir", str(tmp_path), "--json"]) == 0
    rows = {r["name"]: r["present"] for r in json.loads(capsys.readouterr().out)["datasets"]}
    assert rows["ml-100k"] == "broken"
    fetch("ml-100k", tmp_path)  # the unfinished download is redone even though its files exist
    assert not (folder / INCOMPLETE_MARKER).exists() and (folder / "notes.txt").read_text() == "mine\n"
    assert load_dataset("ml-100k", tmp_path).n_ratings == 20
    assert leftovers(folder) == []


def test_failed_final_rename_keeps_nothing(server, tmp_path, monkeypatch):
    folder = tmp_path / "ml-100k"
    real_rename = os.rename

    def fail(src, dst, *args, **kwargs):
        if str(dst) == str(folder):
            raise OSError(5, "Input/output error")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", fail)
    with pytest.raises(DataError, match=r"could not move the files into .*Input/output error.*nothing was kept"):
        download(Download(f"{server}/good.zip", sha(GOOD), ("u.data",)), folder)
    assert list(tmp_path.iterdir()) == []


KILLED_DOWNLOAD = """
import sys
from pathlib import Path
from recsys_flowadam.data.download import download
from recsys_flowadam.data.registry import Download
download(Download(sys.argv[1], None, ("u.data",)), Path(sys.argv[2]))
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the process check are POSIX")
def test_download_killed_mid_transfer_is_cleaned_up_by_the_next(server, tmp_path):
    folder = tmp_path / "ml-100k"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_DOWNLOAD, f"{server}/slow.zip", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not any(p.is_file() and p.stat().st_size for p in tmp_path.rglob("*")):
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".ml-100k.partial-") and not folder.exists()
    download(Download(f"{server}/good.zip", sha(GOOD), ("u.data",)), folder)
    assert [p.name for p in tmp_path.iterdir()] == ["ml-100k"]  # the killed process's partial is gone
    assert leftovers(folder) == []


@pytest.mark.skipif(os.name != "posix", reason="the process check is POSIX")
def test_partials_of_live_downloads_are_kept(server, tmp_path):
    from recsys_flowadam.data import staging

    mine = staging.new_stage(tmp_path, "ml-100k")  # this process: alive
    other_host = tmp_path / ".ml-100k.partial-elsewhere-1-abc"
    other_host.mkdir()
    stale = tmp_path / ".ml-100k.partial-faraway-1-xyz"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * staging.ABANDONED_AFTER_S,) * 2)
    download(Download(f"{server}/good.zip", sha(GOOD), ("u.data",)), tmp_path / "ml-100k")
    assert mine.exists() and other_host.exists() and not stale.exists()
