"""One Ray cluster over several nodes for GRPO: node 0 starts a head on MASTER_ADDR:MASTER_PORT and waits
for NNODES nodes, the others join it; main_ppo then runs on the head's cluster.

    start_head(cfg, env) -> Popen       # node 0: `ray start --head … --block` in the background, once it answers
    wait_for_nodes(address, nnodes)      # node 0: until NNODES nodes are alive
    ray_commands(cfg)                    # this node's `ray start` (head, or join and block)
    stop_head(head, port)                # node 0: stop its own Ray, not `ray stop` (every Ray of the host)

The joined nodes' `ray start --block` return once they lose the head (Ray waits 60 s). `launch.ray_start_args`
adds flags to every `ray start`.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path


def ray_commands(cfg) -> list[str]:
    """This node's `ray start`, blocking: stopping it stops this node's Ray and no other Ray of its host."""
    launch, ray = cfg.launch, str(Path(sys.executable).with_name("ray"))
    extra = shlex.split(str(launch.ray_start_args or ""))
    if int(launch.node_rank) == 0:
        return [ray, "start", "--head", f"--node-ip-address={launch.master_addr}", f"--port={launch.master_port}",
                "--block", *extra]
    return [ray, "start", f"--address={launch.master_addr}:{launch.master_port}", "--block", *extra]


def agree_on_ray_auth() -> None:
    """`ray start --head` turns token auth on by itself when it finds a token (any earlier local ray.init
    writes ~/.ray/auth_token), but a node joining it or a client connecting to it does not: without
    RAY_AUTH_MODE=token they are refused. Set here, it reaches this process and every one it starts."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def answers(addr: str, port: int) -> bool:
    try:
        socket.create_connection((addr, port), timeout=5).close()
        return True
    except OSError:
        return False


def start_head(cfg, env: dict[str, str]) -> subprocess.Popen:
    """The Ray head, in the background, once its port answers."""
    addr, port = str(cfg.launch.master_addr), int(cfg.launch.master_port)
    if answers(addr, port):
        raise SystemExit(f"[ray] {addr}:{port} (MASTER_ADDR:MASTER_PORT) is taken: if an old Ray head still runs "
                         "there, stop it (`ray stop`), or choose another MASTER_PORT")
    head = subprocess.Popen(ray_commands(cfg), env=env)
    while not answers(addr, port):
        if head.poll() is not None:
            raise SystemExit(f"[ray] the Ray head did not start: {shlex.join(head.args)} exited {head.returncode}")
        time.sleep(1)
    return head


def stop_head(head: subprocess.Popen, port: int) -> None:
    """Stop this node's Ray; the other nodes' `ray start --block` exit once they lose it (Ray: 60 s)."""
    from ray._common.utils import get_ray_address_file

    head.terminate()
    head.wait()
    # as `ray stop` does: a plain ray.init() on this host would try to join the cluster named here
    named = Path(get_ray_address_file(None))
    if named.is_file() and named.read_text().strip().endswith(f":{port}"):
        named.unlink()


def wait_for_nodes(address: str, nnodes: int, timeout_s: float = 1800) -> None:
    import ray

    ray.init(address=address, logging_level="ERROR")
    try:
        deadline = time.time() + timeout_s
        while (alive := sum(n["Alive"] for n in ray.nodes())) < nnodes:
            if time.time() > deadline:
                raise SystemExit(f"[ray] only {alive} of {nnodes} nodes joined the Ray head at {address} in "
                                 f"{timeout_s:.0f}s: start this stage on every node with its own NODE_RANK")
            print(f"[ray] {alive}/{nnodes} nodes in the Ray cluster at {address}; waiting", flush=True)
            time.sleep(10)
    finally:
        ray.shutdown()
