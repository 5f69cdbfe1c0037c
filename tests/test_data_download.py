"""Downloads against a local HTTP server on 127.0.0.1: good, corrupted, truncated, path traversal."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import threading
import zipfile

import pytest

from recsys_flowadam.data import DataError, load_dataset, registry
from recsys_flowadam.data.download import download, fetch, safe_extract
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


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    files = {"/good.zip": GOOD, "/evil.zip": EVIL, "/u.data": U_DATA.encode()}

    def do_GET(self):  # noqa: N802 (http.server's naming)
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
    """Anything besides the expected files: temp files, partial downloads."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


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
    assert list(folder.iterdir()) == []


def test_truncated_transfer_is_an_error(server, tmp_path):
    folder = tmp_path / "ml-100k"
    with pytest.raises(DataError, match="download failed.*IncompleteRead"):
        download(Download(f"{server}/truncated.zip", sha(GOOD), ("u.data",)), folder)
    assert list(folder.iterdir()) == []


def test_path_traversal_member_is_refused(server, tmp_path):
    folder = tmp_path / "root" / "ml-100k"
    with pytest.raises(DataError, match=r"unsafe member 'ml-100k/\.\./\.\./evil\.txt'"):
        download(Download(f"{server}/evil.zip", sha(EVIL), ("u.data",)), folder)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "root" / "evil.txt").exists()
    assert list(folder.iterdir()) == []


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


def test_load_dataset_downloads_missing_files_unless_offline(server, tmp_path, monkeypatch):
    info = dataclasses.replace(registry.DATASETS["ml-100k"],
                               downloads=(Download(f"{server}/good.zip", sha(GOOD), ("u.data", "u.item")),))
    monkeypatch.setitem(registry.DATASETS, "ml-100k", info)
    with pytest.raises(DataError, match="offline"):
        load_dataset("ml-100k", tmp_path, offline=True)
    assert not (tmp_path / "ml-100k").exists()  # offline writes nothing
    r = load_dataset("ml-100k", tmp_path)
    assert r.n_ratings == 20 and r.item_titles[0] == "One (1990)"
    assert fetch("ml-100k", tmp_path) == tmp_path / "ml-100k"  # present: nothing to do
