"""Train `fl.models.CharLSTM` on real text: lines of the standard library's docstrings.

The text: the docstrings of a fixed list of standard-library modules (each
module's own and those of its public functions and classes), split into lines.
Every Python install ships it, so the script downloads nothing, and it is prose
written by people, with naturally varied line lengths (8 to 80 characters kept).

Three ways to feed the variable-length lines, the choice this library is about:

* `--mode static` (default): every batch padded to 80; one compiled step serves
  every length pattern, and the loop runs to each batch's longest line.
* `--mode dynamic`: define-by-run, each batch padded to its own longest line;
  one program per distinct padded length.
* `--mode bucketed`: each batch padded to a bucket (16, 32, 48, 64, 80), static
  loops; one program per bucket.

It prints the length distribution, compile counts, the loss per epoch, time per
token and a few sampled lines.

    python examples/char_lstm.py [--mode static|dynamic|bucketed] [--epochs 8]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import functorch_lite as fl

MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "fractions", "functools", "heapq", "inspect",
    "itertools", "json", "logging", "pathlib", "pickle", "random", "re",
    "shutil", "statistics", "string", "subprocess", "textwrap", "threading",
    "typing", "unittest", "uuid", "zipfile",
)  # fmt: skip
MIN_LEN, MAX_LEN = 8, 80
BUCKETS = (16, 32, 48, 64, 80)


def stdlib_lines(max_len: int = MAX_LEN) -> list[str]:
    """Lines of the docstrings of `MODULES`, stripped, 8-80 printable ASCII chars."""
    docs = []
    with warnings.catch_warnings():  # reading some attributes warns (deprecated)
        warnings.simplefilter("ignore")
        for name in MODULES:
            module = importlib.import_module(name)
            docs.append(module.__doc__ or "")
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_"):
                    continue
                if inspect.isfunction(obj) or inspect.isclass(obj):
                    docs.append(inspect.getdoc(obj) or "")
    lines = []
    for doc in docs:
        for line in doc.splitlines():
            line = line.strip()
            if (
                MIN_LEN <= len(line) <= max_len
                and line.isascii()
                and line.isprintable()
            ):
                lines.append(line)
    return sorted(set(lines))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("static", "dynamic", "bucketed"),
                        default="static")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lines", type=int, default=2048, help="lines used")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=MAX_LEN,
                        help="longest line kept (at most 80)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    max_len = min(args.max_len, MAX_LEN)
    lines = stdlib_lines(max_len)
    lines = [lines[i] for i in rng.permutation(len(lines))[: args.lines]]
    chars = sorted(set("".join(lines)))
    vocab = {c: i + 1 for i, c in enumerate(chars)}  # 0: padding
    lengths = np.array([len(line) for line in lines])
    print(
        f"{len(lines)} lines from {len(MODULES)} stdlib modules' docstrings; "
        f"vocabulary {len(vocab) + 1}; lengths min {lengths.min()}, median "
        f"{int(np.median(lengths))}, mean {lengths.mean():.1f}, max {lengths.max()}"
    )
    hist, edges = np.histogram(lengths, bins=(8, 16, 32, 48, 64, 81))
    bins = zip(edges[:-1], edges[1:], hist, strict=True)
    print("  length histogram: " + ", ".join(
        f"{int(a)}-{int(b) - 1}: {h}" for a, b, h in bins
    ))  # fmt: skip

    model = fl.models.CharLSTM(len(vocab) + 1, 32, args.hidden)
    params = model.init(jax.random.key(args.seed))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)
    lstm_mode = "dynamic" if args.mode == "dynamic" else "static"
    step = fl.train.make_step(
        lambda p, tokens, n: model.loss(p, tokens, n, mode=lstm_mode), optimizer
    )

    def batch_of(idx: np.ndarray) -> tuple[jax.Array, jax.Array]:
        longest = int(lengths[idx].max())
        if args.mode == "static":
            width = max_len
        elif args.mode == "bucketed":
            width = min(next(b for b in BUCKETS if b >= longest), max_len)
        else:
            width = longest
        tokens = np.zeros((len(idx), width), np.int32)
        for r, i in enumerate(idx):
            tokens[r, : lengths[i]] = [vocab[c] for c in lines[i]]
        return jnp.asarray(tokens), jnp.asarray(lengths[idx], jnp.int32)

    n_batches = len(lines) // args.batch
    epoch_losses, tokens_seen, train_time = [], 0, 0.0
    for epoch in range(args.epochs):
        order = rng.permutation(len(lines))
        losses = []
        start = time.perf_counter()
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}", unit="batch",
                   disable=None, leave=False)  # fmt: skip
        for b in bar:
            idx = order[b * args.batch : (b + 1) * args.batch]
            tokens, n = batch_of(idx)
            params, opt_state, loss = step(params, opt_state, tokens, n)
            losses.append(loss)
            tokens_seen += int(lengths[idx].sum())
        epoch_losses.append(float(np.mean(jax.device_get(losses))))
        train_time += time.perf_counter() - start
        print(f"epoch {epoch + 1}: loss {epoch_losses[-1]:.4f} "
              f"(compiles so far: {step.stats.compiles})")  # fmt: skip
    per_token = train_time / max(1, tokens_seen)
    print(
        f"mode {args.mode}: {step.stats.compiles} compile(s), "
        f"{per_token * 1e6:.1f} us per token (compiles included)"
    )

    # Sample lines one character at a time, carrying the LSTM state.
    inverse = {i: c for c, i in vocab.items()}
    one = jax.jit(
        lambda p, tok, state: model.apply(
            p, tok, jnp.ones((1,), jnp.int32), initial_state=state,
            return_state=True, mode="dynamic",
        )
    )  # fmt: skip
    samples = []
    key = jax.random.key(args.seed + 1)
    for s in range(args.samples):
        tok = jnp.array([[vocab[chars[s % len(chars)]] if chars else 1]], jnp.int32)
        zeros = jnp.zeros((1, 1, args.hidden))
        state, text = (zeros, zeros), inverse.get(int(tok[0, 0]), "")
        for _ in range(60):
            logits, state = one(params, tok, state)
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits[0, -1] / 0.8))
            if nxt == 0:
                break
            text += inverse[nxt]
            tok = jnp.array([[nxt]], jnp.int32)
        samples.append(text)
        print(f"  sample: {text!r}")
    return {
        "epoch_losses": epoch_losses,
        "compiles": step.stats.compiles,
        "per_token_s": per_token,
        "samples": samples,
        "lengths": lengths,
    }


if __name__ == "__main__":
    main()
