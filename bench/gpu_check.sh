#!/usr/bin/env bash
# One prepared device check (issue 5, "GPU"): the test suite and the benchmark on
# the GPU in a single call. Written for the device machine's `run` tool, where $OUT
# is the folder whose files come back; elsewhere it writes to ./gpu_out.
# Not yet run: no session so far has been lent a device machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# torch defaults to full float32 matmuls; make JAX do the same for a fair comparison.
export JAX_DEFAULT_MATMUL_PRECISION=highest
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$out/device.txt"
# The device machine reaches no registry: use the tree as it is. Packages it lacks
# (safetensors, hypothesis) must travel as wheels (see the device tool's README).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import safetensors, hypothesis" 2>&1 | tee -a "$out/device.txt"
# The suite (CPU-style tests on the GPU backend); the log comes back even on failure.
timeout 240 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -40 | tee "$out/tests.txt"
# The benchmark at its quick size on the GPU, peers included where torch has CUDA.
timeout 240 python bench/retrace_vs_scan.py --backend gpu --out "$out" --name gpu-quick 2>&1 \
  | tail -60 | tee "$out/bench.txt"
