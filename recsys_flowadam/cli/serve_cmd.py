"""``recsys-flowadam serve DIR``: run the prediction service with uvicorn."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from recsys_flowadam.cli import CLIError

APP_FACTORY = "recsys_flowadam.serve.app:create_app"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a trained artifact over HTTP (FastAPI + uvicorn)",
        description=(
            "Serve predictions, recommendations and similar items from an artifact folder. "
            "Other settings come from RECSYS_FLOWADAM_* environment variables "
            "(MAX_PAIRS, MAX_BODY_BYTES, ADMIN_TOKEN, TOPK_THREADS); see serve/README.md."
        ),
    )
    p.add_argument("artifact_dir", metavar="DIR", type=Path, help="artifact folder (model.json + model.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, each loads the artifact (default: 1)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not log every request (saves a little time per request)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from recsys_flowadam.artifact import ArtifactError, load_artifact

    if args.workers < 1:
        raise CLIError("--workers must be at least 1")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in 0..65535, got {args.port}")
    directory = args.artifact_dir.resolve()
    try:
        load_artifact(directory)  # fail here, with a clear message, not in every worker
    except ArtifactError as exc:
        raise CLIError(str(exc)) from None
    # Workers are separate processes that import the app themselves: they need the factory as an
    # import string and read the artifact folder from the environment (the factory's Settings).
    os.environ["RECSYS_FLOWADAM_ARTIFACT_DIR"] = str(directory)
    config = uvicorn.Config(
        APP_FACTORY, factory=True, host=args.host, port=args.port, workers=args.workers, log_level=args.log_level,
        access_log=args.access_log,
    )
    # What uvicorn.run does for these two cases, with the listening socket fixed for workers.
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        Multiprocess(config, sockets=[_with_tcp_proto(config.bind_socket())]).run()
    else:
        server = uvicorn.Server(config)
        server.run()
        if not server.started:
            raise CLIError(f"the server did not start on {args.host}:{args.port} (see the log above)")
    return 0


def _with_tcp_proto(sock: socket.socket) -> socket.socket:
    """The same listening socket, reporting proto=IPPROTO_TCP.

    For --workers > 1 uvicorn binds the socket itself with proto 0; accepted connections
    inherit it and asyncio then skips TCP_NODELAY, so every keep-alive response waits ~40 ms
    for the client's delayed ACK (uvicorn issue #3149). Re-wrapping the descriptor with the
    right proto restores TCP_NODELAY on every connection the workers accept.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
        sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        sock.set_inheritable(True)
    return sock
