"""TensorFlow 2 peers, each run alone in a fresh process (see protocol.py).

    python bench/peers/tf_peer.py --inputs X.npz --peer NAME --out R.json

Workload `dynamicnet` (the reference program, trained in a `tf.function` with
`tf.GradientTape` and Keras SGD with momentum, which equals PyTorch's and
optax's at a constant learning rate):

  tf-function-int         the depth a Python int: one trace per distinct depth,
                          the Python loop unrolled in each graph
  tf-function-tensor      the depth a tensor and the loop `for _ in
                          tf.range(depth)`: AutoGraph makes it one
                          `tf.while_loop`, one graph for every depth (the
                          closest peer of the library's static path)
  tf-function-int-xla     the same with `jit_compile=True`
  tf-function-tensor-xla  likewise; XLA needs a bound on the loop to
                          differentiate it, given as AutoGraph's
                          `maximum_iterations` loop option (max_depth)

Workload `sequence`: Keras `Embedding(mask_zero=True)` -> `LSTM` -> `Dense`, the
train step in a `tf.function` whose input signature leaves the batch and time
dimensions unknown (one graph for every line length, as a TF user would write
it), the mean cross-entropy over the real next-character targets:

  tf-keras-lstm, tf-keras-lstm-xla (jit_compile=True)

TensorFlow runs with its defaults (threads included). Nothing here imports JAX
or functorch_lite.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import measure_plan, peer_main  # noqa: E402

PEERS = (
    "tf-function-int",
    "tf-function-tensor",
    "tf-function-int-xla",
    "tf-function-tensor-xla",
    "tf-keras-lstm",
    "tf-keras-lstm-xla",
)
WORKLOAD_PEERS = {
    "dynamicnet": PEERS[:4],
    "sequence": PEERS[4:],
}


def _sync(loss: Any) -> None:
    loss.numpy()  # waits for the step


def _value(loss: Any) -> float:
    return float(loss.numpy())


def _framework(tf: Any) -> dict[str, Any]:
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return {
        "versions": {"tensorflow": tf.__version__},
        # 0: TensorFlow picks (its default, one per core).
        "threads": threads or os.cpu_count(),
        "threads_setting": threads,
    }


def _dynamicnet(peer: str, config: dict, arrays: dict) -> dict:
    import tensorflow as tf

    names = ("input_linear", "middle_linear", "output_linear")
    w = {n: tf.Variable(arrays[f"{n}.weight"], name=f"{n}_w") for n in names}
    b = {n: tf.Variable(arrays[f"{n}.bias"], name=f"{n}_b") for n in names}
    variables = [v for n in names for v in (w[n], b[n])]
    x, y = tf.constant(arrays["x"]), tf.constant(arrays["y"])
    depths = [int(d) for d in arrays["depths"]]
    max_depth = int(config.get("max_depth", max(depths)))
    optimizer = tf.keras.optimizers.SGD(
        learning_rate=config["lr"], momentum=config["momentum"]
    )
    xla = peer.endswith("-xla")
    by_tensor = "tensor" in peer

    def layer(n: str, h: Any) -> Any:
        return tf.matmul(h, w[n]) + b[n]

    # Depth 0 leaves the middle layer unused: its gradient is zero (not None,
    # which Keras would skip, momentum and all), as in the reference program.
    # The loop is written in the tf.function's own body, where AutoGraph
    # converts it. With jit_compile, XLA differentiates only a bounded loop.
    # (Not `if xla: set_loop_options(...)`: AutoGraph 2.21 removes the call
    # and then fails to parse the empty `if`.)
    bound = max_depth if xla else None
    if by_tensor:

        @tf.function(jit_compile=xla)
        def train_step(depth: Any) -> Any:
            with tf.GradientTape() as tape:
                h = tf.nn.relu(layer("input_linear", x))
                for _ in tf.range(depth):
                    tf.autograph.experimental.set_loop_options(maximum_iterations=bound)
                    h = tf.nn.relu(layer("middle_linear", h))
                loss = tf.reduce_sum(tf.square(layer("output_linear", h) - y))
            grads = tape.gradient(
                loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return loss

    else:

        @tf.function(jit_compile=xla)
        def train_step(depth: Any) -> Any:
            with tf.GradientTape() as tape:
                h = tf.nn.relu(layer("input_linear", x))
                for _ in range(depth):
                    h = tf.nn.relu(layer("middle_linear", h))
                loss = tf.reduce_sum(tf.square(layer("output_linear", h) - y))
            grads = tape.gradient(
                loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return loss

    first_at: dict[int, float] = {}
    current = [None]

    def step(i: int) -> Any:
        depth = depths[i % len(depths)]
        current[0] = depth
        arg = tf.constant(depth, tf.int32) if by_tensor else depth
        start = time.perf_counter() if depth not in first_at else None
        loss = train_step(arg)
        if start is not None:
            loss.numpy()
            first_at[depth] = time.perf_counter() - start
        return loss

    try:
        result = measure_plan(step, _sync, _value, config)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
        if not xla:
            raise
        reason = (err.message or str(err)).strip().splitlines()[0][:300]
        return {
            "status": f"skipped: XLA refused the step at depth {current[0]}: {reason}"
        }
    result.update(_framework(tf))
    steady = result["steady"]["median"]
    result["compiles"] = int(train_step.experimental_get_tracing_count())
    # A new trace shows as a slow first step at that depth; with one graph for
    # every depth only the first depth's first step builds it.
    per_depth = {d: max(t - steady, 0.0) for d, t in sorted(first_at.items())}
    if by_tensor:
        result["compile_seconds"] = per_depth[depths[0]]
    else:
        result["compile_seconds"] = float(sum(per_depth.values()))
        result["compile_per_depth"] = {str(d): t for d, t in per_depth.items()}
    result["notes"] = [
        "compiles = tf.function traces (experimental_get_tracing_count); "
        "compile_seconds = the first step at each new depth less a steady step"
        + (" (only the first depth traces: one graph)" if by_tensor else "")
    ]
    if by_tensor and xla:
        result["notes"].append(
            "jit_compile=True needs a bounded loop to differentiate: the tf.range "
            f"loop is given maximum_iterations={max_depth} (AutoGraph loop option)"
        )
    return result


def _sequence(peer: str, config: dict, arrays: dict) -> dict:
    import tensorflow as tf

    vocab, d_embed, hidden = config["vocab"], config["d_embed"], config["d_hidden"]
    embedding = tf.keras.layers.Embedding(vocab, d_embed, mask_zero=True)
    lstm = tf.keras.layers.LSTM(hidden, return_sequences=True)
    head = tf.keras.layers.Dense(vocab)
    tokens = tf.keras.Input(shape=(None,), dtype="int32")
    model = tf.keras.Model(tokens, head(lstm(embedding(tokens))))
    embedding.set_weights([arrays["embedding.weight"]])
    # Keras's gate order i, f, c, o is PyTorch's i, f, g, o; one bias.
    lstm.set_weights(
        [
            arrays["lstm.weight_ih_l0"],
            arrays["lstm.weight_hh_l0"],
            arrays["lstm.bias_ih_l0"] + arrays["lstm.bias_hh_l0"],
        ]
    )
    head.set_weights([arrays["head.weight"], arrays["head.bias"]])
    optimizer = tf.keras.optimizers.SGD(
        learning_rate=config["lr"], momentum=config["momentum"]
    )
    xla = peer.endswith("-xla")
    spec = tf.TensorSpec([None, None], tf.int32)
    # PyTorch's LSTM (and the library's) has two biases where Keras has their
    # sum: under SGD the sum moves by both gradients, so the Keras bias gets
    # twice its gradient to train the same model.
    lstm_bias = next(
        i for i, v in enumerate(model.trainable_variables) if v is lstm.cell.bias
    )

    @tf.function(
        input_signature=[spec, tf.TensorSpec([None], tf.int32)], jit_compile=xla
    )
    def train_step(tok: Any, lengths: Any) -> Any:
        targets = tf.concat([tok[:, 1:], tf.zeros_like(tok[:, :1])], axis=1)
        positions = tf.range(tf.shape(tok)[1])[None, :]
        mask = tf.cast(positions < (lengths[:, None] - 1), tf.float32)
        with tf.GradientTape() as tape:
            logits = model(tok, training=True)
            per = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
            loss = tf.reduce_sum(per * mask) / tf.reduce_sum(mask)
        grads = tape.gradient(loss, model.trainable_variables)
        grads = [tf.convert_to_tensor(g) for g in grads]
        grads[lstm_bias] = 2.0 * grads[lstm_bias]
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    batches = []
    for tok, lengths in zip(arrays["tokens"], arrays["lengths"], strict=True):
        t_b = int(lengths.max())  # each batch cut to its own longest line
        batches.append(
            (tf.constant(np.ascontiguousarray(tok[:, :t_b])), tf.constant(lengths))
        )

    def step(i: int) -> Any:
        return train_step(*batches[i % len(batches)])

    result = measure_plan(step, _sync, _value, config)
    result.update(_framework(tf))
    result["compiles"] = int(train_step.experimental_get_tracing_count())
    result["compile_seconds"] = max(
        result["first_call_s"] - result["steady"]["median"], 0.0
    )
    result["notes"] = [
        "one tf.function with input_signature [None, None]: one graph for every "
        "batch and line length; compile_seconds = the first step less a steady "
        "step",
        "Keras's LSTM has one bias where PyTorch's has two (b_ih + b_hh), which "
        "SGD moves by twice the gradient: the Keras bias gets 2x its gradient, so "
        "that every peer trains the same model",
    ]
    return result


def run(peer: str, config: dict, arrays: dict) -> dict:
    """Train and measure one peer on the workload in `config`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: F401 - a missing TF is reported as skipped

    workload = config["workload"]
    if peer not in WORKLOAD_PEERS[workload]:
        return {"status": f"skipped: {peer} has no {workload} workload"}
    try:
        if workload == "dynamicnet":
            return _dynamicnet(peer, config, arrays)
        return _sequence(peer, config, arrays)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as err:
        if peer.endswith("-xla"):
            reason = (err.message or str(err)).strip().splitlines()[0][:300]
            return {"status": f"skipped: XLA refused it: {reason}"}
        raise


if __name__ == "__main__":
    sys.exit(peer_main(run, PEERS))
