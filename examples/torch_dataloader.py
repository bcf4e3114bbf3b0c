"""Train a PyTorch model in JAX, fed by a PyTorch DataLoader.

A PyTorch user's first hour: the model is a `torch.nn.Sequential` and the
data comes from a `torch.utils.data.DataLoader`, as they already have them.
`fl.interop.from_torch_module` turns the module into `(params, apply)`: its
weights, and its forward pass as a pure JAX function. The loss and the step
are then ordinary functorch_lite code, and `fit` takes the DataLoader's
batches of torch tensors as they are (converted through DLPack, without a
copy where the dtype allows).

    python examples/torch_dataloader.py [--epochs 20] [--check]

`--check` trains the same module with PyTorch itself (same initial weights,
same batches, SGD with momentum) and prints how far apart the two loss curves
are: float32 rounding only.
"""

from __future__ import annotations

import argparse
import copy

import jax.numpy as jnp
import numpy as np
import optax

import functorch_lite as fl


def main(argv: list[str] | None = None) -> dict:
    import torch  # noqa: PLC0415 - an optional dependency of the library

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)

    # Data and model, the PyTorch way: y = sin(x . w) + noise.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.05 * torch.randn(
        256, 1, generator=g
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=args.batch_size, shuffle=False
    )
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
    )
    reference = copy.deepcopy(module)

    # The same model in JAX.
    params, apply = fl.interop.from_torch_module(module)

    def loss_fn(params, xb, yb):
        return jnp.mean((apply(params, xb) - yb) ** 2)

    optimizer = optax.sgd(args.lr, momentum=0.9)
    step = fl.train.make_step(loss_fn, optimizer)
    batches = [batch for _ in range(args.epochs) for batch in loader]
    params, opt_state, losses = fl.train.fit(
        step, params, optimizer.init(params), batches, progress=False
    )
    print(
        f"{len(losses)} steps ({args.epochs} epochs of {len(loader)} batches): "
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    result = {"losses": losses}
    if args.check:
        opt = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=0.9)
        torch_losses = []
        for xb, yb in batches:
            opt.zero_grad()
            loss = torch.mean((reference(xb) - yb) ** 2)
            loss.backward()
            opt.step()
            torch_losses.append(loss.item())
        gap = float(np.max(np.abs(np.array(torch_losses) - losses)))
        result["torch_losses"] = np.array(torch_losses)
        print(
            f"PyTorch itself: loss {torch_losses[0]:.4f} -> {torch_losses[-1]:.4f}; "
            f"largest difference per step {gap:.2e}"
        )
    return result


if __name__ == "__main__":
    main()
