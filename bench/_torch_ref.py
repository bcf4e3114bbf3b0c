"""The `torch-eager` peer: the PyTorch reference program (define-by-run DynamicNet).

This is the PyTorch "dynamic net" example: a shared middle layer applied a random
number of times per forward pass, summed MSE, SGD with momentum. The only change is
that `forward` takes the depth as an argument, so that every strategy of the
benchmark sees the same depth sequence. Nothing here imports JAX or functorch_lite.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["TorchReference"]


class DynamicNet(torch.nn.Module):
    """The reference module: input, shared middle and output `Linear` layers."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int) -> None:
        super().__init__()
        self.input_linear = torch.nn.Linear(d_in, d_hidden)
        self.middle_linear = torch.nn.Linear(d_hidden, d_hidden)
        self.output_linear = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        h_relu = self.input_linear(x).clamp(min=0)
        for _ in range(depth):
            h_relu = self.middle_linear(h_relu).clamp(min=0)
        return self.output_linear(h_relu)


class TorchReference:
    """One training run of the reference program, started from given weights.

    Args:
      params: the library's params tree as NumPy arrays; weights are `(in, out)`
        and are transposed to torch's `(out, in)`.
      x, y: the batch, float32 NumPy arrays.
      lr, momentum: SGD settings.
      device: a torch device string (`"cpu"` or `"cuda"`).
    """

    def __init__(
        self,
        params: dict[str, dict[str, np.ndarray]],
        x: np.ndarray,
        y: np.ndarray,
        *,
        lr: float,
        momentum: float,
        device: str = "cpu",
    ) -> None:
        d_in, d_hidden = params["input_linear"]["weight"].shape
        d_out = params["output_linear"]["weight"].shape[1]
        self.device = device
        self.model = DynamicNet(d_in, d_hidden, d_out).to(device)
        with torch.no_grad():
            for name, layer in params.items():
                module = getattr(self.model, name)
                module.weight.copy_(
                    torch.from_numpy(np.ascontiguousarray(layer["weight"].T))
                )
                module.bias.copy_(torch.from_numpy(np.array(layer["bias"])))
        self.x = torch.from_numpy(np.array(x)).to(device)
        self.y = torch.from_numpy(np.array(y)).to(device)
        self.criterion = torch.nn.MSELoss(reduction="sum")
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=momentum
        )

    def step(self, depth: int) -> torch.Tensor:
        """Run one training step at `depth`; return the loss (before the update)."""
        y_pred = self.model(self.x, depth)
        loss = self.criterion(y_pred, self.y)
        # set_to_none=False zeroes the .grad buffers in place, as the reference
        # program's zero_grad() did; optax has no accumulated gradient at all.
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def sync(self) -> None:
        """Wait for queued device work (a no-op on the CPU, where torch is eager)."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    @staticmethod
    def losses(handles: list[Any]) -> list[float]:
        """Turn the loss tensors returned by `step` into floats."""
        return [float(h) for h in handles]
