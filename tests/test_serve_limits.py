"""Hostile and oversized request bodies, and the offline API docs (issue 12, items 2, 3 and 16).

In-process tests use FastAPI's TestClient; what depends on a real server (bytes on a socket,
answers before the body has arrived, /health latency under load, the server log) runs against
`recsys-flowadam serve` in a subprocess on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import statistics
import threading
import time
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from test_serve_server import running_server

from recsys_flowadam.serve import body as body_module
from recsys_flowadam.serve import create_app
from recsys_flowadam.serve.body import INLINE_BYTES, structure_exceeds
from recsys_flowadam.serve.errors import MAX_ERRORS, MAX_TEXT, bounded
from recsys_flowadam.serve.settings import Settings
from recsys_flowadam.serve.synthetic import random_artifact

TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}


def strict_json(text: str):
    """Parse as strict JSON: NaN/Infinity in an answer fail the test."""
    def refuse(token: str):
        raise AssertionError(f"non-standard JSON constant {token} in the answer")

    return json.loads(text, parse_constant=refuse)


def pairs_body(n: int, user: str = "u1", item: str = "i1") -> bytes:
    return json.dumps({"pairs": [{"user": user, "item": item}] * n}).encode()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return random_artifact(tmp_path_factory.mktemp("limits") / "model", n_users=20, n_items=30, rank=4)


@pytest.fixture
def client(artifact: Path) -> TestClient:
    return TestClient(create_app(Settings(artifact_dir=artifact, admin_token=TOKEN, max_pairs=5,
                                          max_body_bytes=256 * 1024)))


# -- item 2: NaN and Infinity --------------------------------------------------------------------

NON_FINITE = [
    b'{"pairs":[{"user":NaN,"item":"1"}]}',
    b'{"pairs":[{"user":"1","item":Infinity}]}',
    b'{"pairs":[{"user":"1","item":"2"}],"strict":-Infinity}',
    b'{"path":NaN}',
    b"NaN",
    b"[Infinity, -Infinity]",
]


@pytest.mark.parametrize("body", NON_FINITE, ids=lambda b: b.decode())
@pytest.mark.parametrize("url", ["/v1/predict", "/v1/admin/reload"])
def test_nan_and_infinity_tokens_are_invalid_json(client: TestClient, url: str, body: bytes) -> None:
    r = client.post(url, content=body, headers={**JSON, **AUTH})
    assert r.status_code == 422, r.text
    [error] = strict_json(r.text)["detail"]
    assert error["type"] == "json_invalid" and error["loc"] == ["body"]
    assert "NaN and Infinity are not JSON numbers" in error["msg"]


@pytest.mark.parametrize("url,body", [
    ("/v1/predict", b'{"pairs":[{"user":1e999,"item":"1"},{"user":"2","item":-1e999}]}'),
    ("/v1/admin/reload", b'{"path":1e999}'),
])
def test_overflowing_numbers_are_echoed_as_strict_json(client: TestClient, url: str, body: bytes) -> None:
    """1e999 is valid JSON that parses to inf: the 422 must still be encodable (it was a 500)."""
    r = client.post(url, content=body, headers={**JSON, **AUTH})
    assert r.status_code == 422, r.text
    inputs = [e["input"] for e in strict_json(r.text)["detail"]]
    assert "Infinity" in inputs or "-Infinity" in inputs


def test_bounded_echo() -> None:
    assert bounded(float("nan")) == "NaN" and bounded(float("-inf")) == "-Infinity" and bounded(1.5) == 1.5
    assert bounded("x" * 1000) == "x" * MAX_TEXT + "..."
    assert bounded(list(range(10**5))) == "<array of 100000 items>"
    assert bounded({"a": [1, {"b": float("inf")}]}) == {"a": [1, {"b": "Infinity"}]}
    assert bounded(b"\xff" * 3) == "\ufffd" * 3 and bounded(ValueError("boom")) == "boom"


def test_422_lists_a_bounded_number_of_errors(artifact: Path) -> None:
    c = TestClient(create_app(Settings(artifact_dir=artifact)))
    r = c.post("/v1/predict", content=json.dumps({"pairs": [{"user": k, "item": k} for k in range(300)]}), headers=JSON)
    assert r.status_code == 422
    assert len(strict_json(r.text)["detail"]) == MAX_ERRORS
    long_id = c.post("/v1/predict", json={"pairs": [{"user": "x" * 5000, "item": "1"}]}).json()["detail"][0]
    assert long_id["type"] == "string_too_long" and len(long_id["input"]) == MAX_TEXT + 3


def test_reload_body_is_not_read_without_the_token(client: TestClient, artifact: Path) -> None:
    assert client.post("/v1/admin/reload", content=b"NaN", headers=JSON).status_code == 401
    disabled = TestClient(create_app(Settings(artifact_dir=artifact)))
    assert disabled.post("/v1/admin/reload", content=b"NaN", headers={**JSON, **AUTH}).status_code == 404
    # a body of JSON null, or none at all, reloads the configured folder
    for body in (b"null", b""):
        assert client.post("/v1/admin/reload", content=body, headers={**JSON, **AUTH}).status_code == 200


# -- item 3: byte limit and structure budget -----------------------------------------------------


@pytest.mark.parametrize("raw,limit,expected", [
    (b'{"pairs": [1, 2, 3]}', 4, False),  # one '{', one '[', two commas
    (b'{"pairs": [1, 2, 3]}', 3, True),
    (b'["a,b,c,{,[", "d\\",[,{"]', 2, False),  # separators and an escaped quote inside strings
    (b'["a\\\\", 1, 2]', 3, False),  # an escaped backslash ends the string
    (b'["a\\\\", 1, 2]', 2, True),
    (b' "a,b,{,[" ', 0, False),  # a top-level string
])
def test_structure_count_skips_strings(raw: bytes, limit: int, expected: bool) -> None:
    assert structure_exceeds(raw, limit) is expected


def test_pairs_beyond_the_structure_budget_are_413_before_parsing(client: TestClient, monkeypatch) -> None:
    r = client.post("/v1/predict", content=pairs_body(6), headers=JSON)
    assert r.status_code == 413 and "6 given, at most 5" in r.json()["detail"]
    parsed: list[int] = []
    real = TypeAdapter.validate_json
    monkeypatch.setattr(TypeAdapter, "validate_json", lambda self, raw, **kw: parsed.append(1) or real(self, raw, **kw))
    assert client.post("/v1/predict", content=pairs_body(3), headers=JSON).status_code == 200
    assert parsed == [1]  # the spy sees parsing
    r = client.post("/v1/predict", content=pairs_body(5000), headers=JSON)
    assert r.status_code == 413 and "at most 5 pairs" in r.json()["detail"]
    assert parsed == [1]  # refused from the byte count, nothing was built
    # separators inside IDs are not structure: 5 pairs of such IDs are fine
    odd = pairs_body(5, user='a,b,{[' * 40, item='"x",' * 50)
    assert client.post("/v1/predict", content=odd, headers=JSON).status_code == 200


def test_big_bodies_are_parsed_off_the_event_loop(artifact: Path, monkeypatch) -> None:
    on_loop: list[bool] = []
    real = body_module.parse_json

    def recording(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(body_module, "parse_json", recording)
    c = TestClient(create_app(Settings(artifact_dir=artifact)))
    small, big = pairs_body(10), pairs_body(5000)
    assert len(small) <= INLINE_BYTES < len(big)
    assert c.post("/v1/predict", content=small, headers=JSON).status_code == 200
    r = c.post("/v1/predict", content=big, headers=JSON)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 5000
    assert on_loop == [True, False]


def test_declared_length_over_the_limit_is_413(client: TestClient) -> None:
    r = client.post("/v1/predict", content=b" " * (256 * 1024 + 1), headers=JSON)
    assert r.status_code == 413 and "more than 262144 bytes" in r.json()["detail"]
    assert r.headers["connection"] == "close"


# -- the same against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server(artifact: Path, tmp_path_factory):
    """One worker, a 64 KiB body limit, admin enabled."""
    log = tmp_path_factory.mktemp("small-server") / "server.log"
    env = {"RECSYS_FLOWADAM_MAX_BODY_BYTES": "65536", "RECSYS_FLOWADAM_ADMIN_TOKEN": TOKEN}
    with running_server(artifact, log, workers=1, env=env) as (base, _):
        yield base, log


def _connect(base: str) -> socket.socket:
    url = urlsplit(base)
    sock = socket.create_connection((url.hostname, url.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def test_server_refuses_a_declared_length_before_reading_the_body(small_server) -> None:
    base, _ = small_server
    with _connect(base) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10000000\r\n\r\n")  # and no body at all
        answer = sock.recv(65536)
    assert _status(answer) == 413 and b"connection: close" in answer.lower()


def test_server_cuts_a_chunked_body_off_at_the_limit(small_server) -> None:
    """No Content-Length: the server counts the chunks and answers 413 while the client still sends."""
    base, _ = small_server
    chunk = b"%x\r\n%s\r\n" % (16384, b" " * 16384)
    pending, sent, total, answer = memoryview(b""), 0, 64 * 1024 * 1024, b""
    with _connect(base) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        sock.setblocking(False)
        deadline = time.monotonic() + 20
        while not answer and sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                answer = sock.recv(65536)
            elif writable:
                pending = pending or memoryview(chunk)  # whole chunks only: partial sends resume
                try:
                    n = sock.send(pending)
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    continue
                pending, sent = pending[n:], sent + n
    assert answer and _status(answer) == 413, (sent, answer)
    assert sent < total // 4  # answered long before the whole body was sent


def test_server_answers_nan_with_422_and_logs_no_traceback(small_server) -> None:
    base, log = small_server
    with httpx.Client(base_url=base, timeout=10) as c:
        for url, body in (("/v1/predict", NON_FINITE[0]), ("/v1/admin/reload", NON_FINITE[3]),
                          ("/v1/predict", b'{"pairs":[{"user":1e999,"item":"1"}]}')):
            r = c.post(url, content=body, headers={**JSON, **AUTH})
            assert r.status_code == 422, r.text
            strict_json(r.text)
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
def test_health_stays_prompt_while_clients_post_big_bodies(artifact: Path, tmp_path: Path) -> None:
    """3 clients post ~7.5 MB bodies back to back (default 8 MiB limit) for a few seconds while
    /health and /ready are polled: they must keep answering promptly (before: median ~0.4 s, up to
    seconds; a wrong field holding a big list took seconds per request to echo)."""
    many_pairs = pairs_body(240_000)
    wrong_field = json.dumps({"pairs": [{"user": "u1", "item": "i1"}], "padding": ["ab"] * 1_200_000}).encode()
    with running_server(artifact, tmp_path / "server.log", workers=1) as (base, _):
        stop = threading.Event()
        latencies: list[float] = []
        statuses: list[int] = []
        ping_statuses: list[int] = []

        def post(body: bytes) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                while not stop.is_set():
                    try:
                        statuses.append(c.post("/v1/predict", content=body, headers=JSON).status_code)
                    except httpx.TransportError:
                        statuses.append(0)  # answered early and closed while we were sending

        def ping() -> None:
            with httpx.Client(base_url=base, timeout=30) as c:
                while not stop.is_set():
                    for path in ("/health", "/ready"):
                        t0 = time.perf_counter()
                        ping_statuses.append(c.get(path).status_code)
                        latencies.append(time.perf_counter() - t0)
                    time.sleep(0.02)

        threads = [threading.Thread(target=post, args=(b,)) for b in (many_pairs, many_pairs, wrong_field)]
        threads.append(threading.Thread(target=ping))
        for t in threads:
            t.start()
        time.sleep(5)
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) <= {413, 422, 0}, statuses
    assert len(latencies) > 20 and set(ping_statuses) == {200}
    assert statistics.median(latencies) < 0.1 and max(latencies) < 1.0, sorted(latencies)[-5:]


# -- item 16: offline API docs -------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href", "spec-url") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_reference_only_local_assets(client: TestClient, page: str) -> None:
    html = client.get(page)
    assert html.status_code == 200
    links = _Links()
    links.feed(html.text)
    urls = links.urls + re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)  # the scripts' openapi url
    urls += re.findall(r"""https?://[^\s'"<>)]+|//[a-z0-9.-]+\.[a-z]{2,}/""", html.text)
    assert urls, html.text
    assert all(not urlsplit(u).netloc and not urlsplit(u).scheme for u in urls), urls
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    scripts = [u for u in urls if u.endswith(".js")]
    assert scripts and all("javascript" in client.get(u).headers["content-type"] for u in scripts)
