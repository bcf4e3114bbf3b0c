"""JAX's coordination service, run in a process of its own beside process 0.

`jax.distributed.initialize` runs the coordination service inside process 0.
When that process dies, the service dies with it, and JAX's client in every
other process aborts at once (SIGABRT, a C++ stack trace), before any Python
code can say what happened. `fl.parallel.initialize` therefore starts the
service in this small child process of process 0, and every process, process
0 included, joins as a client. When process 0's trainer dies, the service
lives on, so the other processes' heartbeat (`parallel._Heartbeat`) names the
lost process and they exit with `LOST_PEER_EXIT`, as for any other peer.

The child lives as long as its parent, then a little longer: it reads its
standard input, which the parent holds open. A parent that ends normally
writes "exit" first, and the service stops after a short grace period (the
others are past JAX's shutdown barrier by then). A parent that dies closes
the pipe without a word, and the service stays up for `--linger` seconds, long
enough for the others to notice and stop cleanly. A new process 0 on the same
port ends a service left over from a crashed run (the pid file below): gRPC
lets two services bind one port, and clients would reach either.

Private JAX API: `jax._src.lib._jax.get_distributed_runtime_service`, the
function `jax.distributed.initialize` itself calls (jax 0.10).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

NORMAL_EXIT_GRACE_S = 2.0


def pid_file(port: str) -> str:
    """Where the service on `port` records its process id."""
    return os.path.join(tempfile.gettempdir(), f"functorch_lite-coordinator-{port}.pid")


def log_file(port: str) -> str:
    """Where the service on `port` writes its log (its standard error)."""
    return pid_file(port)[: -len(".pid")] + ".log"


def main(argv: list[str] | None = None) -> None:
    """Run the service until the parent goes (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m functorch_lite._coordinator")
    parser.add_argument("--bind", required=True, help="address to bind, [::]:PORT")
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--heartbeat-timeout", type=int, required=True)
    parser.add_argument("--linger", type=float, required=True)
    args = parser.parse_args(argv)

    from jax._src.lib import _jax  # noqa: PLC0415  # pyright: ignore[reportPrivateImportUsage]

    port = args.bind.rsplit(":", 1)[1]
    service = _jax.get_distributed_runtime_service(
        args.bind,
        args.num_processes,
        heartbeat_timeout=args.heartbeat_timeout,
        shutdown_timeout=300,
    )
    path = pid_file(port)
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    said = sys.stdin.readline().strip()
    time.sleep(NORMAL_EXIT_GRACE_S if said == "exit" else args.linger)
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.remove(path)
                if said == "exit":  # nothing went wrong: no log to keep
                    os.remove(log_file(port))
    except OSError:
        pass
    del service
    os._exit(0)  # the service's shutdown would wait for clients that are gone


if __name__ == "__main__":
    main()
