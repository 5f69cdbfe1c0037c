"""Load test of the prediction service over loopback HTTP; prints its figures.

Starts `recsys-flowadam serve` (a real uvicorn process on 127.0.0.1, free port) on an
ML-100K-sized model (943 users x 1682 items, rank 20: a trained artifact if --ml100k is given,
otherwise random factors) and then on a synthetic 100,000-item model, and measures:

* single-pair POST /v1/predict: throughput and p50/p99 latency at 1 and 32 concurrent clients
* one 10,000-pair POST /v1/predict batch (repeated; p50/p99/max)
* GET recommendations (k=10, rated items excluded) and similar items, at 1 and 32 clients
* the same retrievals in-process (Scorer only), to separate retrieval from HTTP cost

Targets (issue 5, 2-core machine): p99 < 20 ms for single predictions at 32 concurrent
clients; a 10,000-pair batch < 50 ms. Request counts are bounded; the script stops by itself.
The clients are closed-loop (each sends its next request when the previous answer arrived),
so at 32 clients latency ~= 32 / throughput.

    python bench/bench_serve.py [--ml100k ARTIFACT_DIR] [--workers 1] [--requests 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from recsys_flowadam.artifact import load_artifact
from recsys_flowadam.serve.scorer import Scorer
from recsys_flowadam.serve.synthetic import random_artifact

HOST = "127.0.0.1"


# -- a minimal keep-alive HTTP/1.1 client -------------------------------------------------------
# Hand-written on purpose: httpx spends ~0.5 ms of CPU per request, which on a 2-core box shared
# with the server would measure the client rather than the service.


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


def percentiles(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"p50 {np.percentile(a, 50):6.2f} ms  p99 {np.percentile(a, 99):6.2f} ms  max {a.max():6.2f} ms"


async def closed_loop(port: int, clients: int, total: int, make_request) -> tuple[float, list[float]]:
    """`clients` connections each sending total/clients requests back to back; (req/s, latencies)."""
    per_client = max(1, total // clients)
    conns = [await Connection.open(port) for _ in range(clients)]
    latencies: list[float] = []

    async def client(k: int, conn: Connection) -> None:
        rng = np.random.default_rng(k)
        for _ in range(per_client):
            method, path, body = make_request(rng)
            t0 = time.perf_counter()
            status, payload = await conn.request(method, path, body)
            latencies.append((time.perf_counter() - t0) * 1000)
            if status != 200:
                raise RuntimeError(f"{method} {path} answered {status}: {payload[:200]!r}")

    # warm-up (connections, first-call caches), not measured
    warm = np.random.default_rng(999)
    for conn in conns:
        await conn.request(*make_request(warm))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k, c) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - t0
    for conn in conns:
        conn.close()
    return len(latencies) / elapsed, latencies


# -- server process ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, workers: int) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_FLOWADAM_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "recsys_flowadam", "serve", str(artifact), "--host", HOST,
             "--port", str(self.port), "--workers", str(workers), "--log-level", "warning"],
            env=env, start_new_session=True,
        )

    async def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                conn = await Connection.open(self.port)
                status, _ = await conn.request("GET", "/ready")
                conn.close()
                if status == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# -- scenarios -----------------------------------------------------------------------------------


async def bench_model(label: str, artifact: Path, args: argparse.Namespace, *, predict: bool) -> None:
    art = load_artifact(artifact)
    meta = art.meta
    users, items = meta.user_ids, meta.item_ids
    # similar items exist only for items with training ratings (others answer 404)
    trained_items = [items[i] for i in np.unique(art.tensors["train_items"])]
    print(f"\n== {label}: {meta.model_type}, {meta.n_users} users x {meta.n_items} items, rank {meta.rank}")
    server = Server(artifact, args.workers)
    try:
        await server.wait_ready()
        port = server.port

        def one_pair(rng):
            pair = {"user": users[rng.integers(len(users))], "item": items[rng.integers(len(items))]}
            return "POST", "/v1/predict", json.dumps({"pairs": [pair]}).encode()

        def recs(rng):
            return "GET", f"/v1/users/{users[rng.integers(len(users))]}/recommendations?k=10", b""

        def similar(rng):
            return "GET", f"/v1/items/{trained_items[rng.integers(len(trained_items))]}/similar?k=10", b""

        scenarios = [("recommendations k=10", recs), ("similar items k=10", similar)]
        if predict:
            scenarios.insert(0, ("predict 1 pair", one_pair))
        for name, make in scenarios:
            for clients in (1, 32):
                n = args.requests if clients == 32 else args.requests // 2
                rps, lat = await closed_loop(port, clients, n, make)
                print(f"{name:22s} {clients:2d} clients  {len(lat):5d} req  {rps:7.0f} req/s  {percentiles(lat)}")

        if predict:
            rng = np.random.default_rng(0)
            pairs = [{"user": users[u], "item": items[i]}
                     for u, i in zip(rng.integers(len(users), size=10_000), rng.integers(len(items), size=10_000))]
            body = json.dumps({"pairs": pairs}).encode()
            conn = await Connection.open(port)
            lat = []
            for k in range(args.batches + 2):
                t0 = time.perf_counter()
                status, payload = await conn.request("POST", "/v1/predict", body)
                if k >= 2:  # two warm-up calls
                    lat.append((time.perf_counter() - t0) * 1000)
                assert status == 200 and len(json.loads(payload)["predictions"]) == 10_000
            conn.close()
            print(f"predict 10,000 pairs    1 client   {len(lat):5d} req  ({len(body) / 1e6:.2f} MB in)  {percentiles(lat)}")
    finally:
        server.stop()

    # the same BLAS thread count as the server's workers (TOPK_THREADS default 1; see serve/app.py),
    # so the in-process figures measure the same retrieval and do not depend on spare cores
    blas = threadpool_limits(limits=1, user_api="blas")
    scorer = Scorer(load_artifact(artifact))
    rng = np.random.default_rng(1)
    for name, fn, ids in (("recommend", scorer.recommend, users), ("similar", scorer.similar, trained_items)):
        picks = [ids[k] for k in rng.integers(len(ids), size=300)]
        t0 = time.perf_counter()
        for x in picks:
            fn(x, 10)
        print(f"in-process {name:9s} k=10: {(time.perf_counter() - t0) / len(picks) * 1000:.3f} ms per call")
    if predict:
        pu = [users[k] for k in rng.integers(len(users), size=10_000)]
        pi = [items[k] for k in rng.integers(len(items), size=10_000)]
        t0 = time.perf_counter()
        for _ in range(10):
            scorer.predict(pu, pi)
        print(f"in-process predict 10,000 pairs: {(time.perf_counter() - t0) / 10 * 1000:.2f} ms")
    blas.restore_original_limits()


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.ml100k:
            ml = Path(args.ml100k)
            kind = f"trained artifact {ml}"
        else:
            ml = random_artifact(Path(tmp) / "ml100k", n_users=943, n_items=1682, rank=20, ratings_per_user=106,
                                 dataset_name="ml100k-shaped-random", seed=0)
            kind = "random factors, ML-100K shape"
        await bench_model(f"ML-100K model ({kind})", ml, args, predict=True)
        big = random_artifact(Path(tmp) / "big", n_users=10_000, n_items=100_000, rank=20, ratings_per_user=50,
                              titles=True, dataset_name="synthetic-100k-items", seed=1)
        await bench_model("synthetic 100k-item model (random factors)", big, args, predict=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ml100k", help="a trained ML-100K artifact folder (default: random factors of that shape)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default 1)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per 32-client scenario (half at 1 client)")
    parser.add_argument("--batches", type=int, default=20, help="10,000-pair requests to time")
    args = parser.parse_args()
    from importlib.util import find_spec

    extras = [name for name in ("uvloop", "httptools") if find_spec(name) is not None]
    print(f"bench_serve: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start, "
          f"workers={args.workers}, uvicorn extras: {', '.join(extras) or 'none (pure-Python h11, asyncio loop)'}")
    asyncio.run(main_async(args))
    print(f"load average {os.getloadavg()[0]:.2f} at end (other processes share these cores)")


if __name__ == "__main__":
    main()
