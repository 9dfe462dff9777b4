"""A throwaway Redis Cluster on free loopback ports, for tests and benchmarks.

Real redis-server processes in cluster mode, joined with
`redis-cli --cluster create`, as a managed cluster-mode Redis would be.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

# Short, so a killed primary is replaced within a couple of seconds in tests
# (the server's default is 15 s); shorter still where replicas wait to take over.
NODE_TIMEOUT_MS = 1000
FAILOVER_NODE_TIMEOUT_MS = 500


class Cluster:
    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 0):
        self.workdir = workdir
        self.primaries, self.replicas = primaries, replicas
        self.procs: dict[int, subprocess.Popen] = {}
        self.node_timeout_ms = FAILOVER_NODE_TIMEOUT_MS if replicas else NODE_TIMEOUT_MS

    @property
    def url(self) -> str:
        """Any one node: the client discovers the rest."""
        return f"redis://127.0.0.1:{next(iter(self.procs))}/0"

    def start(self, server: str, cli: str) -> Cluster:
        count = self.primaries * (1 + self.replicas)
        for _ in range(count):
            port = _free_node_port(taken=set(self.procs))
            self.procs[port] = self._start_node(server, port)
        for port in self.procs:
            _wait_for_ping(port)
        nodes = [f"127.0.0.1:{port}" for port in self.procs]
        subprocess.run(
            [cli, "--cluster", "create", *nodes]
            + ["--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_until_ok()
        return self

    def _start_node(self, server: str, port: int) -> subprocess.Popen:
        node_dir = self.workdir / str(port)
        node_dir.mkdir()
        return subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)]
            + ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes"]
            + ["--cluster-node-timeout", str(self.node_timeout_ms)]
            + ["--cluster-config-file", "nodes.conf"]
            # A replica may take over however long its link was down: a test
            # kills a primary seconds after the cluster was created.
            + ["--cluster-replica-validity-factor", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and agrees on the primaries."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._node_ok(port) for port, proc in self.procs.items() if proc.poll() is None):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def _node_ok(self, port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as node:
            try:
                info = node.cluster("info")
                primaries = [n for n in node.cluster("nodes").values() if "master" in n["flags"]]
            except redis.RedisError:
                return False
        live = [n for n in primaries if "fail" not in n["flags"]]
        return info["cluster_state"] == "ok" and len(live) == self.primaries

    def primary_of(self, key: str) -> int:
        """The port of the primary that holds `key`'s slot now."""
        with RedisCluster(host="127.0.0.1", port=next(iter(self.live_ports()))) as client:
            return client.get_node_from_key(key).port

    def wait_for_replicas(self, timeout: float = 10.0) -> None:
        """Until every replica has all its primary's writes (replication is asynchronous)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._replicas_caught_up(port) for port in self.live_ports()):
                return
            time.sleep(0.05)
        raise RuntimeError("the replicas did not catch up")

    def _replicas_caught_up(self, port: int) -> bool:
        with redis.Redis(host="127.0.0.1", port=port) as node:
            info = node.info("replication")
        if info["role"] != "master":
            return True
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return all(r["offset"] == info["master_repl_offset"] for r in replicas)

    def live_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def kill(self, port: int) -> None:
        """A node dies without warning (SIGKILL), as a crashed or lost machine would."""
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _free_node_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in taken:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _wait_for_ping(port: int) -> None:
    with redis.Redis(host="127.0.0.1", port=port) as node:
        for _ in range(100):
            try:
                node.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not start")


def start_cluster(workdir: Path, primaries: int = 3, replicas: int = 0) -> Cluster:
    """A running cluster; needs redis-server and redis-cli (Debian's redis-server package)."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed for a Redis Cluster.")
    cluster = Cluster(workdir, primaries, replicas)
    try:
        return cluster.start(server, cli)
    except BaseException:
        cluster.stop()
        raise
