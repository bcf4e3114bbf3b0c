"""PyTorch peers, each run alone in a fresh process (see protocol.py).

    python bench/peers/torch_peer.py --inputs X.npz --peer NAME --out R.json

Workload `dynamicnet` (the reference program: a shared middle layer applied a
Python-int `depth` times, summed MSE, SGD with momentum):

  torch-eager            the reference program as written
  torch-compile          `torch.compile(model)` with its defaults: the int depth
                         is guarded on, so each new depth recompiles, until
                         dynamo's recompile limit sends the frame back to eager
  torch-compile-dynamic  `torch.compile(model, dynamic=True)`

Compiling the model (not the optimizer step) is the documented path most users
take; the backward pass is compiled with it (AOTAutograd).

Workload `sequence` (embedding, one LSTM layer, linear head; mean cross-entropy
over the real next-character targets; each batch cut to its own longest line):

  torch-packed    `pack_padded_sequence` -> LSTM -> `pad_packed_sequence`
  torch-padded    the LSTM over the padded batch, loss masked (oneDNN's fused
                  LSTM: the fastest way users pick)
  torch-compile   the padded model under `torch.compile` defaults

torch runs with its own defaults: its default thread count, no
`set_num_threads`. Nothing here imports JAX or functorch_lite.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import measure_plan, peer_main  # noqa: E402

PEERS = (
    "torch-eager",
    "torch-compile",
    "torch-compile-dynamic",
    "torch-packed",
    "torch-padded",
)
WORKLOAD_PEERS = {
    "dynamicnet": ("torch-eager", "torch-compile", "torch-compile-dynamic"),
    "sequence": ("torch-packed", "torch-padded", "torch-compile"),
}


def _dynamo_counts(torch: Any) -> dict[str, Any]:
    """Graphs compiled so far and dynamo's compile seconds, from its counters."""
    from torch._dynamo import utils

    stats = utils.counters.get("stats", {})
    seconds = None
    try:  # "name, t1, t2, ..." per line; dynamo's whole compile is compile_inner
        for line in utils.compile_times(repr="str").splitlines():
            name, _, values = line.partition(",")
            if name.strip() == "_compile.compile_inner":
                seconds = sum(float(v) for v in values.split(",") if v.strip())
        if seconds is None and stats.get("unique_graphs"):
            seconds = None
        elif seconds is None:
            seconds = 0.0
    except Exception:  # noqa: BLE001 - internal API; the figure is optional
        seconds = None
    return {
        "unique_graphs": int(stats.get("unique_graphs", 0)),
        "calls_captured": int(stats.get("calls_captured", 0)),
        "seconds": seconds,
        "recompile_limit": int(
            getattr(torch._dynamo.config, "recompile_limit", 0)
            or getattr(torch._dynamo.config, "cache_size_limit", 0)
        ),
    }


def _graph_breaks() -> list[str]:
    """The first line of each reason dynamo gave for a graph break or a skip."""
    from torch._dynamo import utils

    reasons = list(utils.counters.get("graph_break", {}))
    reasons += list(utils.counters.get("unimplemented", {}))
    return sorted({k.splitlines()[0] for k in reasons})


def _limit_hit(torch: Any) -> bool:
    from torch._dynamo import utils

    counters = utils.counters
    return any(
        "cache_size_limit" in key or "recompile_limit" in key
        for key in list(counters.get("unimplemented", {}))
        + list(counters.get("frames", {}))
    )


def _dynamicnet(peer: str, config: dict, arrays: dict) -> dict:
    import torch

    class DynamicNet(torch.nn.Module):
        def __init__(self, d_in: int, h: int, d_out: int) -> None:
            super().__init__()
            self.input_linear = torch.nn.Linear(d_in, h)
            self.middle_linear = torch.nn.Linear(h, h)
            self.output_linear = torch.nn.Linear(h, d_out)

        def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
            h_relu = self.input_linear(x).clamp(min=0)
            for _ in range(depth):
                h_relu = self.middle_linear(h_relu).clamp(min=0)
            return self.output_linear(h_relu)

    d_in, h = arrays["input_linear.weight"].shape
    d_out = arrays["output_linear.weight"].shape[1]
    model = DynamicNet(d_in, h, d_out)
    with torch.no_grad():
        for name in ("input_linear", "middle_linear", "output_linear"):
            layer = getattr(model, name)
            layer.weight.copy_(torch.from_numpy(arrays[f"{name}.weight"].T.copy()))
            layer.bias.copy_(torch.from_numpy(arrays[f"{name}.bias"].copy()))
    x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"])
    depths = [int(d) for d in arrays["depths"]]
    limit = config.get("torch_recompile_limit")
    if limit is not None:
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = int(limit)
        else:
            torch._dynamo.config.cache_size_limit = int(limit)
    forward = model
    # torch's default backend (inductor); the tests name a cheaper one where
    # they check dynamo's graph counts rather than inductor's kernels.
    backend = config.get("torch_compile_backend", "inductor")
    if peer == "torch-compile":
        forward = torch.compile(model, backend=backend)
    elif peer == "torch-compile-dynamic":
        forward = torch.compile(model, dynamic=True, backend=backend)
    criterion = torch.nn.MSELoss(reduction="sum")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=config["momentum"]
    )
    first_at: dict[int, float] = {}

    def step(i: int) -> torch.Tensor:
        depth = depths[i % len(depths)]
        start = time.perf_counter() if depth not in first_at else None
        loss = criterion(forward(x, depth), y)
        # Zeroed in place, as the reference program's zero_grad() did: at depth
        # 0 the middle layer then gets a zero gradient and momentum still moves
        # it (set_to_none, torch 2's default, would skip it).
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        if start is not None:
            first_at[depth] = time.perf_counter() - start
        return loss.detach()

    result = measure_plan(step, lambda h: None, float, config)
    result.update(_framework(torch))
    notes = []
    if peer == "torch-eager":
        result["compiles"] = None
        result["compile_seconds"] = None
    else:
        counts = _dynamo_counts(torch)
        hit = _limit_hit(torch)
        result["compiles"] = counts["unique_graphs"]
        result["compile_seconds"] = counts["seconds"]
        result["compile_backend"] = backend
        result["recompile_limit"] = counts["recompile_limit"]
        result["recompile_limit_hit"] = hit
        steady = result["steady"]["median"]
        # The first step at each depth, less a steady step: that depth's build.
        result["compile_per_depth"] = {
            str(d): max(t - steady, 0.0) for d, t in sorted(first_at.items())
        }
        notes.append(
            "torch.compile(model): forward and backward compiled, optimizer eager; "
            "compiles = dynamo's unique graphs, compile_seconds = dynamo's "
            "compile-time accounting"
        )
        if hit:
            notes.append(
                f"hit dynamo's recompile limit ({counts['recompile_limit']}): "
                "depths past it run the model in eager mode"
            )
    result["notes"] = notes
    return result


def _sequence(peer: str, config: dict, arrays: dict) -> dict:
    import torch
    from torch.nn.utils import rnn

    vocab, d_embed, hidden = config["vocab"], config["d_embed"], config["d_hidden"]

    class CharLSTM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, d_embed)
            self.lstm = torch.nn.LSTM(d_embed, hidden, batch_first=True)
            self.head = torch.nn.Linear(hidden, vocab)

        def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None):
            x = self.embedding(tokens)
            if lengths is None:
                out, _ = self.lstm(x)
            else:
                packed = rnn.pack_padded_sequence(
                    x, lengths, batch_first=True, enforce_sorted=False
                )
                out, _ = self.lstm(packed)
                out, _ = rnn.pad_packed_sequence(
                    out, batch_first=True, total_length=tokens.shape[1]
                )
            return self.head(out)

    model = CharLSTM()
    with torch.no_grad():
        model.embedding.weight.copy_(torch.from_numpy(arrays["embedding.weight"]))
        for name in ("weight_ih_l0", "weight_hh_l0"):
            value = torch.from_numpy(arrays[f"lstm.{name}"].T.copy())
            getattr(model.lstm, name).copy_(value)
        for name in ("bias_ih_l0", "bias_hh_l0"):
            getattr(model.lstm, name).copy_(torch.from_numpy(arrays[f"lstm.{name}"]))
        model.head.weight.copy_(torch.from_numpy(arrays["head.weight"].T.copy()))
        model.head.bias.copy_(torch.from_numpy(arrays["head.bias"]))
    backend = config.get("torch_compile_backend", "inductor")
    compiled = peer == "torch-compile"
    forward = torch.compile(model, backend=backend) if compiled else model
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config["lr"], momentum=config["momentum"]
    )
    # Each batch cut to its own longest line, as a PyTorch user pads per batch.
    batches = []
    for tokens, lengths in zip(arrays["tokens"], arrays["lengths"], strict=True):
        t_b = int(lengths.max())
        tok = torch.from_numpy(np.ascontiguousarray(tokens[:, :t_b]).astype(np.int64))
        n = torch.from_numpy(lengths.astype(np.int64))
        targets = torch.cat([tok[:, 1:], torch.zeros_like(tok[:, :1])], dim=1)
        mask = torch.arange(t_b)[None, :] < (n[:, None] - 1)
        batches.append((tok, n, targets, mask))

    def step(i: int) -> torch.Tensor:
        tok, n, targets, mask = batches[i % len(batches)]
        logits = forward(tok, n if peer == "torch-packed" else None)
        per = torch.nn.functional.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), reduction="none"
        )
        loss = (per * mask.reshape(-1)).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.detach()

    result = measure_plan(step, lambda h: None, float, config)
    result.update(_framework(torch))
    if peer == "torch-compile":
        counts = _dynamo_counts(torch)
        result["compiles"] = counts["unique_graphs"]
        result["compile_seconds"] = counts["seconds"]
        result["compile_backend"] = backend
        result["recompile_limit_hit"] = _limit_hit(torch)
        notes = [
            "torch.compile(model) with its defaults on padded batches (the batch "
            "length varies)"
        ]
        breaks = _graph_breaks()
        result["graph_breaks"] = breaks
        if breaks:
            notes.append(
                "dynamo broke the graph: "
                + "; ".join(breaks)
                + (
                    " (torch._dynamo.config.allow_rnn is False by default: nn.LSTM "
                    "runs eagerly)"
                    if any("LSTM" in b for b in breaks)
                    else ""
                )
            )
        result["notes"] = notes
    else:
        result["compiles"] = None
        result["compile_seconds"] = None
        result["notes"] = []
    return result


def _framework(torch: Any) -> dict[str, Any]:
    return {
        "versions": {"torch": torch.__version__},
        "threads": torch.get_num_threads(),
    }


def run(peer: str, config: dict, arrays: dict) -> dict:
    """Train and measure one peer on the workload in `config`."""
    import torch

    # Dynamo's caches and counters are per process: start from none (a no-op
    # in the fresh process the benchmark gives each peer).
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    workload = config["workload"]
    if peer not in WORKLOAD_PEERS[workload]:
        return {"status": f"skipped: {peer} has no {workload} workload"}
    if workload == "dynamicnet":
        return _dynamicnet(peer, config, arrays)
    return _sequence(peer, config, arrays)


if __name__ == "__main__":
    sys.exit(peer_main(run, PEERS))
