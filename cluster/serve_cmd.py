"""`pagedserve serve`: the OpenAI-compatible HTTP API as a driver on the cluster, bringing the
daemon up first (on an embedded local Ray cluster when none is running)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
import time

from cluster.config import load_config
from scheduler.wording import counted

CLUSTER_PROBE_S = 1.0  # how often the server checks that the cluster's GCS answers
CLUSTER_GONE_S = 3.0  # silent this long: the cluster is gone (`ray stop`), the server ends
GRACEFUL_SHUTDOWN_S = 10.0  # then requests in flight get this long before they are cut


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (embedded local Ray "
                                     "cluster if none is running)")
    p.add_argument("--host", default=None,
                   help="address to listen on (default: the config's http.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None,
                   help="port to listen on (default: the config's http.port, 8000)")
    p.add_argument("--config", default=None,
                   help="a preset (cpu-sim, ascend-910b) or a YAML file; default cpu-sim")
    p.add_argument("--address", default="auto",
                   help="Ray cluster address (default: auto; with no cluster running, an "
                        "embedded local one)")
    p.set_defaults(func=run)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0 picks a free one). Bound before
    the daemon comes up, so a busy port fails fast with one line."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be in [0, 65535]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from cluster import bringup
    from cluster.client import Client
    from cluster.daemon_cmds import format_status, warn_config_not_applied
    from cluster.embedded import EmbeddedDaemon
    from cluster.http import api_keys_from, create_app

    cfg = load_config(args.config)
    host = args.host or cfg.http.host
    sock = bind_socket(host, cfg.http.port if args.port is None else args.port)
    if not api_keys_from(cfg) and not is_loopback(host):
        print(f"warning: listening on {host} with no API keys: anyone who can reach this "
              "port can use the model (set PAGEDSERVE_API_KEYS or http.api_keys)",
              file=sys.stderr)
    daemon = None
    try:
        if args.address == "auto" and not bringup.cluster_is_running():
            print(f"no Ray cluster running: starting an embedded one with "
                  f"{counted(cfg.cluster.simulated_npus, 'simulated NPU')}", file=sys.stderr)
            daemon = EmbeddedDaemon(cfg)
            cfg, status, client = daemon.config, daemon.status, daemon.client
        else:
            bringup.connect(args.address, alternative="leave --address out to start an "
                                                    "embedded local cluster")
            status, client = bringup.up(cfg), Client(args.address)
        print(format_status(status), file=sys.stderr)
        warn_config_not_applied(status, again="serve")
        _serve(create_app(client, cfg), sock, host, cfg.engine.model)
    finally:
        if daemon is not None:
            daemon.close()
        sock.close()
    return 0


def _serve(app, sock: socket.socket, host: str, model: str) -> None:
    """Serve until Ctrl-C, or until the Ray cluster is gone: then exit 1 at once."""
    import ray
    import uvicorn

    port = sock.getsockname()[1]
    print(f"serving {model!r} at http://{host}:{port}/v1 (OpenAI-compatible); Ctrl-C stops",
          file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    watch = ClusterWatch(ray.get_runtime_context().gcs_address, server, app.state.server.client)
    watch.start()
    try:
        server.run(sockets=[sock])
    finally:
        watch.stop()
    if watch.gone:
        print(f"pagedserve: the Ray cluster is gone ({watch.gone}): stopped serving",
              file=sys.stderr, flush=True)
        # no normal exit: Ray's driver threads, and calls still trying to reach the lost
        # cluster (taking an embedded daemon down too), would hold the process a minute more
        os._exit(1)


class ClusterWatch(threading.Thread):
    """Ends the server once the cluster's GCS has not answered for CLUSTER_GONE_S (`ray
    stop`): its requests would hang until Ray's own driver gives up on the GCS, ~60 s later,
    and kills the process with no answer to anyone. ``gone``: why it ended the server."""

    def __init__(self, gcs_address: str, server, client) -> None:
        super().__init__(name="cluster-watch", daemon=True)
        self.gcs_address = gcs_address
        self.server = server
        self.client = client
        self.gone: str | None = None
        self._stopped = threading.Event()

    def run(self) -> None:
        from cluster.bringup import gcs_unreachable

        since = None
        while not self._stopped.wait(CLUSTER_PROBE_S):
            reason = gcs_unreachable(self.gcs_address)
            if reason is None:
                since = None
                continue
            since = since or time.monotonic()
            if time.monotonic() - since >= CLUSTER_GONE_S:
                self.gone = reason
                self.client.mark_cluster_gone(reason)  # requests in flight end with a 503
                self.server.should_exit = True
                return

    def stop(self) -> None:
        self._stopped.set()
