"""The real thing: `recsys-flowadam serve` in a subprocess (two uvicorn workers) over loopback HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from recsys_flowadam.artifact import load_artifact
from recsys_flowadam.serve.scorer import Scorer
from recsys_flowadam.serve.synthetic import random_artifact


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(artifact: Path, log_path: Path, *, workers: int = 2,
                   env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """`recsys-flowadam serve ARTIFACT` on a free loopback port, ready; yields (base URL, process).

    ``env`` adds RECSYS_FLOWADAM_* settings; the caller's own RECSYS_FLOWADAM_* are not passed on.
    The process group (uvicorn's supervisor and its workers) is stopped on exit.
    """
    port = _free_port()
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_FLOWADAM_")}
    child_env.update(env or {})
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "recsys_flowadam", "serve", str(artifact), "--host", "127.0.0.1",
         "--port", str(port), "--workers", str(workers), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}: {log_path.read_text()}")
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in 60 s: {log_path.read_text()}")
            time.sleep(0.2)
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


@pytest.fixture
def server(tmp_path: Path):
    artifact = random_artifact(tmp_path / "model", n_users=50, n_items=80, rank=8, seed=4, factor_std=1.0)
    with running_server(artifact, tmp_path / "server.log") as (base, _):
        yield base, artifact


@pytest.mark.slow
def test_real_server_over_http(server) -> None:
    base, artifact = server
    scorer = Scorer(load_artifact(artifact))
    users = ["u1", "u2", "ghost", "u49"]
    items = ["i0", "nothing", "i5", "i79"]
    with httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/model").json()["n_items"] == 80
        # many requests, so both worker processes answer some: all agree with the model
        for _ in range(20):
            r = client.post("/v1/predict", json={"pairs": [{"user": u, "item": i} for u, i in zip(users, items)]})
            assert r.status_code == 200
            got = [p["rating"] for p in r.json()["predictions"]]
            np.testing.assert_allclose(got, scorer.predict(users, items).ratings, atol=1e-12)
        rec = client.get("/v1/users/u1/recommendations", params={"k": 5}).json()
        assert [x["item"] for x in rec["items"]] == [f"i{i}" for i in scorer.recommend("u1", 5)[0]]
        assert client.get("/v1/items/i3/similar", params={"k": 3}).status_code == 200
        assert client.post("/v1/predict", content=b"{nope", headers={"content-type": "application/json"}).status_code == 422
        assert client.post("/v1/admin/reload").status_code == 404  # no token configured


def test_cli_rejects_broken_artifact(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_flowadam", "serve", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "artifact folder does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_worker_connections_get_tcp_nodelay() -> None:
    """The listening socket handed to uvicorn's workers makes asyncio enable TCP_NODELAY on
    accepted connections (without it every keep-alive response waits for a delayed ACK)."""
    import asyncio

    from recsys_flowadam.cli.serve_cmd import _with_tcp_proto

    listener = socket.socket(socket.AF_INET)  # like uvicorn's Config.bind_socket: proto 0
    listener.bind(("127.0.0.1", 0))
    listener = _with_tcp_proto(listener)
    assert listener.proto == socket.IPPROTO_TCP

    async def accept_one() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accept_one()) != 0
