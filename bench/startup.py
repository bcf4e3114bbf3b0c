"""Start-up benchmark: a whole new process running 500 reference DynamicNet steps.

Each run is a fresh Python process that imports, compiles (or loads from the
persistent compilation cache), trains 500 steps of the reference program and exits.
Rows:

- `fl-static-nocache`: functorch_lite, static path, per-step calls, cache off.
- `fl-static-cold`: the same with the persistent cache on, in an empty folder.
- `fl-static-warm`: the same with the cache filled by an earlier process.
- `fl-fused-warm`: 500 steps in one `make_fused_step` call, warm cache.
- `torch-eager`: the PyTorch reference program (skipped without torch).

    python bench/startup.py [--repeats 3] [--steps 500] [--out bench/results]
        [--name startup-cpu2]

Prints a table of median wall seconds (min-max) and ratios to `torch-eager`, and
writes `<out>/<name>.json` (default name `startup-<timestamp>`). The child
processes run on the CPU (`JAX_PLATFORMS=cpu` unless the caller sets it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

FL_PROGRAM = """
import sys
import numpy as np
fused = sys.argv[2] == "fused"
import jax, jax.numpy as jnp, optax
import functorch_lite as fl
steps = int(sys.argv[1])
kx, ky, kp = jax.random.split(jax.random.key(0), 3)
x, y = jax.random.normal(kx, (64, 1000)), jax.random.normal(ky, (64, 10))
net = fl.models.DynamicNet(1000, 100, 10)
opt = optax.sgd(1e-4, momentum=0.9)
params = net.init(kp); opt_state = opt.init(params)
def loss_fn(params, x, y, depth):
    return fl.nn.mse_loss(net.apply(params, x, depth), y)
depths = np.random.default_rng(0).integers(0, 4, size=steps).astype(np.int32)
if fused:
    run = fl.train.make_fused_step(loss_fn, opt, shared_argnames=("x", "y"))
    params, opt_state, losses = run(params, opt_state, x, y, depths)
    loss = losses[-1]
else:
    step = fl.train.make_step(loss_fn, opt)
    for d in depths:
        params, opt_state, loss = step(params, opt_state, x, y, d)
print(float(loss))
"""

TORCH_PROGRAM = """
import sys
import numpy as np
import torch
steps = int(sys.argv[1])
class DynamicNet(torch.nn.Module):
    def __init__(self, d_in, h, d_out):
        super().__init__()
        self.input_linear = torch.nn.Linear(d_in, h)
        self.middle_linear = torch.nn.Linear(h, h)
        self.output_linear = torch.nn.Linear(h, d_out)
    def forward(self, x, depth):
        h_relu = self.input_linear(x).clamp(min=0)
        for _ in range(depth):
            h_relu = self.middle_linear(h_relu).clamp(min=0)
        return self.output_linear(h_relu)
torch.manual_seed(0)
x, y = torch.randn(64, 1000), torch.randn(64, 10)
model = DynamicNet(1000, 100, 10)
criterion = torch.nn.MSELoss(reduction="sum")
optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
depths = np.random.default_rng(0).integers(0, 4, size=steps)
for d in depths:
    loss = criterion(model(x, int(d)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(loss.item())
"""


def _run(code: str, args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def _torch_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], capture_output=True, check=False
    )
    return probe.returncode == 0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)

    base_env = {k: v for k, v in os.environ.items() if k != "FUNCTORCH_LITE_CACHE_DIR"}
    base_env["JAX_PLATFORMS"] = base_env.get("JAX_PLATFORMS", "cpu")
    steps = str(args.steps)
    rows: dict[str, list[float] | str] = {
        "fl-static-nocache": [],
        "fl-static-cold": [],
        "fl-static-warm": [],
        "fl-fused-warm": [],
        "torch-eager": [],
    }
    have_torch = _torch_available()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            # Interleave the rows so that machine noise hits all of them alike.
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            rows["fl-static-nocache"].append(
                _run(FL_PROGRAM, [steps, "step"], base_env)
            )  # type: ignore[union-attr]
            cold = dict(
                base_env, FUNCTORCH_LITE_CACHE_DIR=os.path.join(tmp, f"cold{r}")
            )
            rows["fl-static-cold"].append(_run(FL_PROGRAM, [steps, "step"], cold))  # type: ignore[union-attr]
            warm = dict(base_env, FUNCTORCH_LITE_CACHE_DIR=os.path.join(tmp, "warm"))
            if r == 0:  # fill the warm cache for both programs
                _run(FL_PROGRAM, [steps, "step"], warm)
                _run(FL_PROGRAM, [steps, "fused"], warm)
            rows["fl-static-warm"].append(_run(FL_PROGRAM, [steps, "step"], warm))  # type: ignore[union-attr]
            rows["fl-fused-warm"].append(_run(FL_PROGRAM, [steps, "fused"], warm))  # type: ignore[union-attr]
            if have_torch:
                rows["torch-eager"].append(_run(TORCH_PROGRAM, [steps], base_env))  # type: ignore[union-attr]
    if not have_torch:
        rows["torch-eager"] = "skipped: torch not installed"

    summary = {}
    torch_median = (
        statistics.median(rows["torch-eager"]) if have_torch else None  # type: ignore[arg-type]
    )
    print(f"\n{'row':<20} {'median s':>9} {'min':>7} {'max':>7} {'vs torch':>9}")
    for name, times in rows.items():
        if isinstance(times, str):
            print(f"{name:<20} {times}")
            summary[name] = {"skipped": times}
            continue
        med = statistics.median(times)
        ratio = med / torch_median if torch_median else None
        summary[name] = {
            "median_s": med,
            "min_s": min(times),
            "max_s": max(times),
            "runs_s": times,
            "ratio_to_torch_eager": ratio,
        }
        ratio_text = f"{ratio:.2f}x" if ratio else "-"
        print(
            f"{name:<20} {med:9.2f} {min(times):7.2f} {max(times):7.2f} {ratio_text:>9}"
        )

    import jax
    import jaxlib
    import optax

    record = {
        "benchmark": "startup",
        "steps": args.steps,
        "repeats": args.repeats,
        "rows": summary,
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax.__version__,
        },
        "backend": base_env["JAX_PLATFORMS"],
        "cores": os.cpu_count(),
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or time.strftime("startup-%Y%m%d-%H%M%S")
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {out / f'{name}.json'}")
    return record


if __name__ == "__main__":
    main()
