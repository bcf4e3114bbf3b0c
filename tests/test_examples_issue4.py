"""The per-example-gradient and ensemble examples run, at small sizes, and check out."""

from __future__ import annotations

import importlib.util
import pathlib
import runpy
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SMALL = ["--d-in", "12", "--d-hidden", "8", "--d-out", "3"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_per_example_grads_match_the_loop(mode, capsys):
    out = load("per_example_grads").main(
        ["--mode", mode, "--batch", "5", "--depth", "3", *SMALL]
    )
    assert out["grads"]["middle_linear"]["weight"].shape == (5, 8, 8)
    assert out["max_diff"] <= 1e-6 * max(out["max_grad"], 1.0)
    assert "max |vmap - loop| =" in capsys.readouterr().out


def test_ensemble_trains_members_independently_with_one_compile(capsys):
    out = load("ensemble").main(
        ["--members", "4", "--steps", "30", "--batch", "16", "--lr", "1e-3"]
        + SMALL
        + ["--check"]
    )
    printed = capsys.readouterr().out
    assert out["compiles"] == 1
    assert "compiles of the ensemble step: 1" in printed
    assert out["final_losses"].shape == (4,)
    assert np.all(out["final_losses"] < out["initial_losses"])
    assert printed.count("member ") >= 4
    # A member trained alone ends where its ensemble copy ends.
    assert out["alone_max_diff"] < 1e-5


def test_example_runs_as_a_script(monkeypatch, capsys):
    # Both examples end in the same `if __name__ == "__main__": main()`.
    path = str(EXAMPLES / "per_example_grads.py")
    monkeypatch.setattr(sys, "argv", [path, "--batch", "3", *SMALL])
    runpy.run_path(path, run_name="__main__")
    assert "max |vmap - loop|" in capsys.readouterr().out
