"""/health and /ready latency while clients post big bodies to /v1/predict (issue 12, item 3).

Starts `recsys-flowadam serve` (a real uvicorn process on 127.0.0.1, a free port) on a small
random-factor artifact, pings /health and /ready alone for a few seconds, then again while
``--clients`` threads post ``--mb`` MB bodies back to back, and prints the ping latencies, what
the big posts got back and the server's peak RSS. Loopback only; every phase stops after
``--seconds``, so the script ends by itself.

Body kinds (each under the default 8 MiB limit, all refused in the end):

* ``many-pairs``: ~250,000 short pairs (more than MAX_PAIRS: 413)
* ``long-ids``: ~14,500 pairs of 256-character IDs (413)
* ``strings``: 10 valid pairs and an extra field holding ~1.5 million short strings (422)

    python bench/bench_health_under_load.py [--clients 4] [--mb 7.5] [--seconds 8] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
from bench_serve import HOST, Server  # bench/ is on sys.path when this script runs

from recsys_flowadam.serve.synthetic import random_artifact


def make_body(kind: str, megabytes: float) -> bytes:
    """A JSON body of about ``megabytes`` MB of the given kind."""
    size = int(megabytes * 1e6)
    if kind == "many-pairs":
        pair = {"user": "u1", "item": "i1"}
        n = size // len(json.dumps(pair).encode())
        return json.dumps({"pairs": [pair] * n}).encode()
    if kind == "long-ids":
        pair = {"user": "u" * 256, "item": "i" * 256}
        n = size // len(json.dumps(pair).encode())
        return json.dumps({"pairs": [pair] * n}).encode()
    if kind == "strings":
        pairs = [{"user": "u1", "item": "i1"}] * 10
        return json.dumps({"pairs": pairs, "padding": ["ab"] * (size // 6)}).encode()
    raise ValueError(kind)


def ping(port: int, stop: threading.Event, latencies: dict[str, list[float]], every: float = 0.02) -> None:
    """GET /health and /ready in turn on one keep-alive connection until ``stop``; latencies in ms."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    k = 0
    while not stop.is_set():
        path = "/health" if k % 2 == 0 else "/ready"
        t0 = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        latencies[path].append((time.perf_counter() - t0) * 1000)
        assert response.status == 200, (path, response.status)
        k += 1
        time.sleep(every)
    conn.close()


def post_loop(port: int, body: bytes, stop: threading.Event, outcomes: Counter, durations: list[float]) -> None:
    """POST ``body`` to /v1/predict back to back until ``stop``; count the status codes."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    headers = {"Content-Type": "application/json"}
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/predict", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            outcomes[response.status] += 1
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            outcomes["closed while sending (answered early)"] += 1
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=60)
        durations.append((time.perf_counter() - t0) * 1000)
    conn.close()


def summary(ms: list[float]) -> str:
    a = np.asarray(ms)
    return (f"n={a.size:4d}  p50 {np.percentile(a, 50):7.2f} ms  p90 {np.percentile(a, 90):7.2f} ms  "
            f"p99 {np.percentile(a, 99):7.2f} ms  max {a.max():7.2f} ms")


def phase(port: int, seconds: float, body: bytes | None, clients: int) -> None:
    stop = threading.Event()
    latencies: dict[str, list[float]] = {"/health": [], "/ready": []}
    outcomes: Counter = Counter()
    durations: list[float] = []
    threads = [threading.Thread(target=ping, args=(port, stop, latencies))]
    if body is not None:
        threads += [threading.Thread(target=post_loop, args=(port, body, stop, outcomes, durations))
                    for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(90)
    for path, ms in latencies.items():
        print(f"  {path:8s} {summary(ms)}")
    if body is not None:
        print(f"  big POSTs: {dict(outcomes)}; per POST {summary(durations)}")


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the server process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--mb", type=float, default=7.5)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kinds", default="many-pairs,long-ids,strings")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = random_artifact(Path(tmp) / "model", n_users=50, n_items=80, rank=8)
        server = Server(artifact, args.workers)
        try:
            asyncio.run(server.wait_ready())
            print(f"server pid {server.proc.pid}, {args.workers} worker(s); idle:")
            phase(server.port, min(args.seconds, 3.0), None, 0)
            for kind in args.kinds.split(","):
                body = make_body(kind, args.mb)
                print(f"{args.clients} clients posting '{kind}' bodies of {len(body) / 1e6:.2f} MB:")
                phase(server.port, args.seconds, body, args.clients)
            if args.workers == 1:
                print(f"server peak RSS {peak_rss_mb(server.proc.pid):.0f} MB")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
