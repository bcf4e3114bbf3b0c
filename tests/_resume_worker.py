"""One process of a 2-process training run with checkpoints, for the resume tests.

Not collected by pytest. `test_multihost.py` starts two of these on
127.0.0.1; each trains the DynamicNet problem of `_parallel_worker.py` under
`data_parallel` with `fl.train.fit`, checkpointing every 3 steps, for each
run of a JSON plan:

    python tests/_resume_worker.py --process-id 0 --num-processes 2 \
        --port 12345 --out DIR --plan '[{"name": "ref", "dir": "DIR/ref"}]'

A run's `dir` may hold `{i}` (the process index): a folder per process.
`resume` resumes; `kill_at` makes process 1 SIGKILL itself when `fit` asks
for that step's batch; `kill_writing_at` makes process 0 SIGKILL itself
half-way through writing that step's checkpoint. Each process writes
`DIR/<name>.process<i>.npz` (final params, losses) and `.json` (how many
checkpoints it wrote, the step it resumed from).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

import functorch_lite as fl

sys.path.insert(0, os.path.dirname(__file__))

import _parallel_worker as shared  # noqa: E402

STEPS, EVERY, ROWS = 14, 3, 8


def _problem() -> dict:
    return shared.problem("static", ROWS, steps=STEPS)


def _batches(prob: dict, me: int, count: int, kill_at: int | None, out: str) -> Any:
    rows = ROWS // count
    mine = slice(me * rows, (me + 1) * rows)
    for i, depth in enumerate(prob["depths"]):
        if kill_at is not None and me == 1 and i + 1 == kill_at:
            with open(os.path.join(out, "killed_at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        yield prob["x"][mine], prob["y"][mine], depth


def _kill_while_writing(step: int) -> None:
    """Make this process die half-way through writing checkpoint `step`."""
    write = fl.checkpoint._write_file

    def half_then_die(path: str, treedef: str, leaves: list, what: str) -> None:
        if os.path.basename(path) == f"ckpt_{step:08d}.safetensors":
            with open(fl.checkpoint._temp_path(path), "wb") as f:
                f.write(b"half a checkpoint")
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, treedef, leaves, what)

    fl.checkpoint._write_file = half_then_die


def main(argv: list[str] | None = None) -> None:
    parser = shared.process_parser(__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--heartbeat", type=float, default=3.0)
    args = parser.parse_args(argv)
    fl.parallel.initialize(
        f"127.0.0.1:{args.port}",
        args.num_processes,
        args.process_id,
        cpu_devices=2,
        heartbeat_timeout_s=args.heartbeat,
    )
    me, count = jax.process_index(), jax.process_count()
    saves = []
    save = fl.checkpoint.save_numbered_async

    def counting_save(directory: Any, step: int, tree: Any, **kw: Any) -> Any:
        saves.append(step)
        return save(directory, step, tree, **kw)

    fl.checkpoint.save_numbered_async = counting_save
    for run in json.loads(args.plan):
        saves.clear()
        if run.get("kill_writing_at") is not None and me == 0:
            _kill_while_writing(run["kill_writing_at"])
        prob = _problem()
        step = fl.parallel.data_parallel(prob["make_step"]())
        params = prob["net"].init(jax.random.key(0))
        opt_state = prob["optimizer"].init(params)
        params, opt_state, losses = fl.train.fit(
            step,
            params,
            opt_state,
            _batches(prob, me, count, run.get("kill_at"), args.out),
            progress=False,
            checkpoint_every=EVERY,
            checkpoint_dir=run["dir"].format(i=me),
            resume=bool(run.get("resume")),
        )
        leaves = {
            str(j): np.asarray(leaf.addressable_data(0))
            for j, leaf in enumerate(jax.tree.leaves(params))
        }
        base = os.path.join(args.out, f"{run['name']}.process{me}")
        np.savez(base + ".npz", losses=losses, **leaves)
        with open(base + ".json", "w") as f:
            json.dump({"saves": list(saves), "resumed_from": STEPS - len(losses)}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
