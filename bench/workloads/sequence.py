"""The variable-length workload: a character LSTM over lines of real text.

The text: lines of the standard library's docstrings (`examples/char_lstm.py`
picks them), which every Python install ships: prose written by people, with
its natural length distribution (8 to 80 characters). Each step trains
`fl.models.CharLSTM` (embedding 32, one LSTM layer, linear head; mean
cross-entropy over the real next-character targets; SGD with momentum) on a
batch of lines. How to feed lines of different lengths is the question:

  dynamic        each batch cut to its own longest line, the LSTM a Python loop
                 (`mode="dynamic"`): one program per distinct padded length
  bucketed       each batch padded to a power of two (`fl.train.bucket_size`),
                 the static loop inside: one program per bucket
  static-padded  every batch padded to the data set's longest line, and every
                 step runs all of its positions (the LSTM unrolled over T, masked)
  static         the library's default: padded to the longest line, one
                 program, the loop running to each batch's longest line
  fused          `static` with K steps per call (`make_fused_step`)
  plain-jax      hand-written JAX: `lax.scan` over the padded length with masks,
                 `jax.jit` + optax, no functorch_lite in the step

Peers, each alone in a fresh process (bench/peers/): PyTorch eager with packed
sequences and with padding, `torch.compile`, and TensorFlow 2 (a Keras LSTM
with masking inside a `tf.function`, with and without XLA). All train the same
model from the same weights on the same batches; the report checks that their
losses agree.

`run(cfg, out_dir)` measures everything and returns a JSON-ready dict;
bench/_report.py reports it (`sequence_markdown`, `sequence_plot`).
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

from peers import protocol  # noqa: E402

STRATEGIES = ("dynamic", "bucketed", "static-padded", "static", "fused", "plain-jax")
PEERS = {
    "torch-packed": "torch_peer.py",
    "torch-padded": "torch_peer.py",
    "torch-compile": "torch_peer.py",
    "tf-keras-lstm": "tf_peer.py",
    "tf-keras-lstm-xla": "tf_peer.py",
}
# Quick: lines of at most 24 characters, whole, so that batches still have
# several distinct longest lines, and a smaller LSTM: the `dynamic` strategy
# compiles an unrolled loop per distinct length (65 s at 80 characters and
# hidden 128 on 2 cores), which the quick run cannot afford.
QUICK = {
    "batch": 16,
    "steps_data": 24,
    "max_len": 24,
    "long_lines": "drop",
    "d_hidden": 64,
    "sweep": (1, 3),  # distinct lengths
    "sweep_strategies": ("bucketed", "static"),
    "marks": (1, 10, 50),
    "block": 10,
    "repeats": 5,
    "peers": ("torch-padded", "tf-keras-lstm"),
}
FULL = {
    "batch": 32,
    "steps_data": 256,
    "max_len": 80,
    "long_lines": "cut",
    "d_hidden": 128,
    "sweep_strategies": ("dynamic", "bucketed", "static"),
    "sweep": (1, 2, 4, 8),  # distinct lengths
    "marks": (1, 10, 100, 1000),
    "block": 50,
    "repeats": 7,
    "peers": tuple(PEERS),
}
D_EMBED, LR, MOMENTUM, FUSE_K = 32, 1.0, 0.9, 10


def _lines() -> list[str]:
    spec = importlib.util.spec_from_file_location(
        "char_lstm", BENCH.parent / "examples" / "char_lstm.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.stdlib_lines()


def build(cfg: dict[str, Any], lines: list[str] | None = None) -> tuple[dict, dict]:
    """The batches and the initial weights, in the peers' inputs format.

    Lines longer than `cfg["max_len"]` are cut to it (fewer distinct lengths),
    or with `long_lines="drop"` left out (the quick run: short lines with
    their natural lengths); the vocabulary is that of the whole text.
    """
    lines = _lines() if lines is None else lines
    chars = sorted(set("".join(lines)))
    vocab = {c: i + 1 for i, c in enumerate(chars)}  # 0: padding
    rng = np.random.default_rng(cfg["seed"])
    b, s, max_len = cfg["batch"], cfg["steps_data"], cfg["max_len"]
    pool = lines
    if cfg.get("long_lines", "cut") == "drop":  # keep the short lines whole
        pool = [line for line in lines if len(line) <= max_len]
    picks = rng.integers(0, len(pool), size=(s, b))
    cut = [[pool[i][:max_len] for i in row] for row in picks]
    k = cfg.get("distinct")
    if k:  # the sweep: batch i's lines cut to the i % k-th of k widths
        # spread up to the shortest longest line of a batch, so that every
        # batch of a group has exactly its width: k distinct padded lengths.
        cap = min(max(len(x) for x in row) for row in cut)
        widths = sweep_widths(cap, k)
        cut = [
            [line[: widths[i % len(widths)]] for line in row]
            for i, row in enumerate(cut)
        ]
    lengths = np.array([[len(line) for line in row] for row in cut], np.int32)
    width = int(lengths.max())
    tokens = np.zeros((s, b, width), np.int32)
    for i, row in enumerate(cut):
        for j, line in enumerate(row):
            tokens[i, j, : len(line)] = [vocab[c] for c in line]
    model = fl.models.CharLSTM(len(vocab) + 1, cfg["d_embed"], cfg["d_hidden"])
    params = model.init(jax.random.key(cfg["seed"]))
    arrays: dict[str, np.ndarray] = {"tokens": tokens, "lengths": lengths}
    for layer, leaves in params.items():
        for name, value in leaves.items():
            arrays[f"{layer}.{name}"] = np.asarray(value)
    config = {
        "workload": "sequence",
        "vocab": len(vocab) + 1,
        "d_embed": cfg["d_embed"],
        "d_hidden": cfg["d_hidden"],
        "lr": cfg["lr"],
        "momentum": cfg["momentum"],
        "max_len": max_len,
        "marks": list(cfg["marks"]),
        "record": cfg["record"],
        "block": cfg["block"],
        "repeats": cfg["repeats"],
    }
    return config, arrays


def _params(config: dict, arrays: dict) -> tuple[Any, dict]:
    model = fl.models.CharLSTM(config["vocab"], config["d_embed"], config["d_hidden"])
    params: dict[str, dict[str, jax.Array]] = {}
    for key, value in arrays.items():
        layer, _, name = key.partition(".")
        if name:
            params.setdefault(layer, {})[name] = jnp.asarray(value)
    return model, params


def _plain_jax_step(config: dict, optimizer: Any) -> Any:
    """What a JAX user writes: embedding, an LSTM cell in `lax.scan`, masks."""

    def loss_fn(p, tokens, lengths):
        x = p["embedding"]["weight"][tokens]  # (B, T, E)
        lstm = p["lstm"]
        h0 = jnp.zeros((tokens.shape[0], config["d_hidden"]), x.dtype)

        def cell(carry, inp):
            h, c = carry
            x_t, live = inp
            gates = (
                x_t @ lstm["weight_ih_l0"]
                + h @ lstm["weight_hh_l0"]
                + (lstm["bias_ih_l0"] + lstm["bias_hh_l0"])[None, :]
            )
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            keep = live[:, None]
            h, c = jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)
            return (h, c), h

        t = jnp.arange(tokens.shape[1])
        live = t[:, None] < lengths[None, :]  # (T, B)
        _, hs = jax.lax.scan(cell, (h0, h0), (jnp.swapaxes(x, 0, 1), live))
        logits = jnp.swapaxes(hs, 0, 1) @ p["head"]["weight"]
        logits = logits + p["head"]["bias"][None, None, :]
        targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], 1)
        mask = t[None, :] < (lengths[:, None] - 1)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.sum(mask, dtype=nll.dtype)

    def plain_jax_step(params, opt_state, tokens, lengths):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(plain_jax_step, donate_argnums=(0, 1))


def _batches(strategy: str, arrays: dict) -> list[tuple[jax.Array, jax.Array]]:
    """Each batch as the strategy feeds it: (tokens padded to its width, lengths)."""
    out = []
    width = arrays["tokens"].shape[2]
    for tokens, lengths in zip(arrays["tokens"], arrays["lengths"], strict=True):
        longest = int(lengths.max())
        if strategy == "dynamic":
            w = longest
        elif strategy == "bucketed":
            w = min(fl.train.bucket_size(longest), width)
        else:
            w = width
        out.append((jnp.asarray(tokens[:, :w]), jnp.asarray(lengths)))
    return out


def _measure_strategy(name: str, config: dict, arrays: dict) -> dict[str, Any]:
    model, master = _params(config, arrays)
    optimizer = optax.sgd(config["lr"], momentum=config["momentum"])
    params = jax.tree.map(jnp.copy, master)
    opt_state = optimizer.init(params)
    plan = {k: config[k] for k in ("marks", "record", "block", "repeats")}
    state = {"params": params, "opt_state": opt_state}
    counter = None
    if name == "fused":
        k = FUSE_K
        fused = fl.train.make_fused_step(
            lambda p, t, n: model.loss(p, t, n, mode="static"), optimizer
        )
        batches = _batches("static", arrays)
        s = len(batches)

        def step(i: int) -> Any:  # call i runs steps i*K .. i*K+K-1
            idx = [(i * k + j) % s for j in range(k)]
            tok = jnp.stack([batches[j][0] for j in idx])
            n = jnp.stack([batches[j][1] for j in idx])
            state["params"], state["opt_state"], losses = fused(
                state["params"], state["opt_state"], tok, n
            )
            return losses

        marks = sorted({max(1, m // k) for m in plan["marks"]})
        result = protocol.measure(
            step,
            jax.block_until_ready,
            lambda h: [float(v) for v in np.asarray(h)],
            marks=marks,
            record=-(-plan["record"] // k),
            block=max(1, plan["block"] // k),
            repeats=plan["repeats"],
        )
        result["losses"] = [v for call in result["losses"] for v in call]
        result["losses"] = result["losses"][: plan["record"]]
        result["totals"] = {str(int(m) * k): t for m, t in result["totals"].items()}
        for key in ("median", "min", "max"):
            result["steady"][key] /= k
        result["steady"]["all"] = [t / k for t in result["steady"]["all"]]
        result["steady"]["block_steps"] *= k
        result["first_call_steps"] = k
        result["compiles"] = fused.stats.compiles
        result["compile_seconds"] = fused.stats.compile_seconds
        return result
    if name == "plain-jax":
        compiled = _plain_jax_step(config, optimizer)
        batches = _batches("static", arrays)
        counter = True
    else:
        mode = "dynamic" if name in ("dynamic", "static-padded") else "static"
        compiled = fl.train.make_step(
            lambda p, t, n: model.loss(p, t, n, mode=mode), optimizer
        )
        batches = _batches(name, arrays)

    def step(i: int) -> Any:
        tok, n = batches[i % len(batches)]
        state["params"], state["opt_state"], loss = compiled(
            state["params"], state["opt_state"], tok, n
        )
        return loss

    if counter is not None:
        with fl.compile_counter("plain_jax_step") as seen:
            result = protocol.measure(step, jax.block_until_ready, float, **plan)
        result["compiles"] = seen.compiles
        result["compile_seconds"] = seen.seconds
    else:
        result = protocol.measure(step, jax.block_until_ready, float, **plan)
        result["compiles"] = compiled.stats.compiles
        result["compile_seconds"] = compiled.stats.compile_seconds
    result["first_call_steps"] = 1
    return result


def _tokens(arrays: dict, steps: int, width_of: Any) -> tuple[float, float]:
    """Mean real target tokens and padded positions per step, over `steps` steps."""
    s = len(arrays["lengths"])
    real, padded = [], []
    for i in range(steps):
        lengths = arrays["lengths"][i % s]
        real.append(float(np.sum(lengths - 1)))
        padded.append(float(len(lengths) * width_of(lengths)))
    return statistics.mean(real), statistics.mean(padded)


def _width_fn(name: str, width: int) -> Any:
    if name in ("static", "static-padded", "fused", "plain-jax"):
        return lambda n: width
    if name == "bucketed":
        return lambda n: min(fl.train.bucket_size(int(n.max())), width)
    return lambda n: int(n.max())  # dynamic and the per-batch peers


def derived(result: dict, arrays: dict) -> dict:
    """Per-token figures, totals at 10/100/1000 steps and measured crossovers."""
    width = arrays["tokens"].shape[2]
    for name, res in result["runs"].items():
        if res.get("status", "ok") != "ok":
            continue
        block = res["steady"]["block_steps"]
        real, padded = _tokens(arrays, block, _width_fn(name, width))
        step_s = res["steady"]["median"]
        res["real_tokens_per_step"] = real
        res["padded_tokens_per_step"] = padded
        res["us_per_real_token"] = step_s / real * 1e6
        res["us_per_padded_token"] = step_s / padded * 1e6
    ok = {n: r for n, r in result["runs"].items() if r.get("status", "ok") == "ok"}
    marks = sorted({int(m) for r in ok.values() for m in r["totals"]})
    result["totals"] = {
        n: {str(m): r["totals"].get(str(m)) for m in marks} for n, r in ok.items()
    }
    # Where one strategy's total time (compiles included) drops below another's:
    # analytic, compile seconds + steps x steady step.
    crossings = []
    names = list(ok)
    for a in names:
        for b in names:
            if a == b:
                continue
            ca = ok[a].get("compile_seconds") or 0.0
            cb = ok[b].get("compile_seconds") or 0.0
            sa, sb = ok[a]["steady"]["median"], ok[b]["steady"]["median"]
            if sa < sb and ca > cb:
                crossings.append(
                    {
                        "strategy": a,
                        "versus": b,
                        "from_step": math.ceil((ca - cb) / (sb - sa)),
                    }
                )
    result["crossovers"] = crossings
    return result


def _peer_runs(config: dict, arrays: dict, peers: Any, folder: Path) -> dict:
    inputs = protocol.save_inputs(folder / "sequence.npz", config, arrays)
    out = {}
    for peer in peers:
        res = protocol.run_peer(BENCH / "peers" / PEERS[peer], peer, inputs, folder)
        res["process"] = "own"
        out[peer] = res
    return out


def run(cfg: dict[str, Any], progress: Any = None) -> dict[str, Any]:
    """Measure every strategy and peer; then the sweep of distinct lengths."""
    say = progress or (lambda text: None)
    lines = _lines()
    start = time.perf_counter()
    config, arrays = build(cfg, lines)
    runs: dict[str, dict] = {}
    for name in cfg["strategies"]:
        runs[name] = _measure_strategy(name, config, arrays)
        runs[name]["process"] = "this"
        say(_line(name, runs[name]))
    folder = Path(tempfile.mkdtemp(prefix="sequence-peers-"))
    for name, res in _peer_runs(config, arrays, cfg["peers"], folder).items():
        runs[name] = res
        say(_line(name, res))
    result = {
        "workload": "sequence",
        "config": {
            **config,
            **{k: cfg[k] for k in ("batch", "steps_data", "seed", "long_lines")},
        },
        "text": {
            "lines": len(lines),
            "distinct_batch_lengths": len(set(arrays["lengths"].max(axis=1).tolist())),
            "length_median": float(np.median([len(x) for x in lines])),
        },
        "runs": runs,
    }
    derived(result, arrays)
    result["sweep"] = sweep(cfg, lines, say)
    result["agreement"] = _agreement(runs)
    result["wall_seconds"] = time.perf_counter() - start
    return result


def sweep_widths(max_len: int, k: int) -> list[int]:
    """`k` cut widths spread evenly up to `max_len`: k distinct batch lengths."""
    return sorted({max(2, round(max_len * (j + 1) / k)) for j in range(k)})


def sweep(cfg: dict[str, Any], lines: list[str], say: Any) -> list[dict]:
    """Steady time per real token against the number of distinct lengths.

    For each k in `cfg["sweep"]`, batch i's lines are cut to the i % k-th of
    k widths spread up to the shortest of the batches' longest lines
    (truncating the longest lines), so that the batches have k distinct padded
    lengths: `dynamic` compiles k programs, `bucketed` one per power of two
    among them, `static` one.
    """
    rows = []
    for k in cfg["sweep"]:
        c2, a2 = build({**cfg, "distinct": k, "marks": (1, 10)}, lines)
        widths = sorted(set(a2["lengths"].max(axis=1).tolist()))
        distinct = len(set(a2["lengths"][: c2["block"]].max(axis=1).tolist()))
        row = {
            "widths": widths,
            "max_len": cfg["max_len"],
            "distinct_lengths": distinct,
            "strategies": {},
        }
        for name in cfg["sweep_strategies"]:
            res = _measure_strategy(name, c2, a2)
            real, _ = _tokens(
                a2, res["steady"]["block_steps"], _width_fn(name, cfg["max_len"])
            )
            row["strategies"][name] = {
                "compiles": res["compiles"],
                "steady_s": res["steady"]["median"],
                "us_per_real_token": res["steady"]["median"] / real * 1e6,
            }
        rows.append(row)
        say(
            f"sweep {distinct} distinct lengths (widths {widths}): "
            + ", ".join(
                f"{n} {v['us_per_real_token']:.3g} us/token"
                for n, v in row["strategies"].items()
            )
        )
    return rows


def _line(name: str, res: dict) -> str:
    if res.get("status", "ok") != "ok":
        return f"sequence {name:<18} {res['status']}"
    where = " (own process)" if res.get("process") == "own" else ""
    return (
        f"sequence {name:<18}{where} compiles={res.get('compiles')} "
        f"first call={res['first_call_s']:.2f}s "
        f"steady={res['steady']['median'] * 1e3:.3g} ms/step"
    )


def _agreement(runs: dict, reference: str = "static") -> dict:
    ref = runs.get(reference, {}).get("losses")
    out = {}
    if not ref:
        return out
    for name, res in runs.items():
        losses = res.get("losses")
        if res.get("status", "ok") != "ok" or not losses:
            continue
        n = min(len(ref), len(losses))
        out[name] = {
            "steps": n,
            "max_rel_dev": max(
                abs(a - b) / abs(b) for a, b in zip(losses[:n], ref[:n], strict=True)
            ),
        }
    return out


def config(full: bool, **overrides: Any) -> dict[str, Any]:
    """The quick or full configuration, with overrides."""
    preset = FULL if full else QUICK
    cfg = {
        "batch": preset["batch"],
        "steps_data": preset["steps_data"],
        "max_len": preset["max_len"],
        "long_lines": preset["long_lines"],
        "sweep": preset["sweep"],
        "marks": preset["marks"],
        "block": preset["block"],
        "repeats": preset["repeats"],
        "record": 10,
        "d_embed": D_EMBED,
        "d_hidden": preset["d_hidden"],
        "lr": LR,
        "momentum": MOMENTUM,
        "seed": 0,
        "strategies": STRATEGIES,
        "sweep_strategies": preset["sweep_strategies"],
        "peers": preset["peers"],
    }
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg
