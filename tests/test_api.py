"""The public API is small and pinned."""

import functorch_lite as fl


def test_all_is_pinned_and_sorted():
    assert fl.__all__ == sorted(fl.__all__)
    assert fl.__all__ == [
        "CompileStats",
        "TracedValueError",
        "checkpoint",
        "compile_counter",
        "control",
        "enable_persistent_cache",
        "interop",
        "jit",
        "models",
        "nn",
        "parallel",
        "repeat",
        "train",
        "transforms",
        "while_loop",
    ]
    for name in fl.__all__:
        assert hasattr(fl, name), name


def test_submodule_all():
    assert fl.train.__all__ == [
        "FitResult",
        "bucket_size",
        "fit",
        "make_fused_step",
        "make_step",
        "make_update",
        "pad_batch",
    ]
    assert fl.models.__all__ == [
        "CharLSTM",
        "DynamicNet",
        "TwoLayerNet",
        "check_params",
        "check_x",
    ]
    assert fl.nn.__all__ == [
        "Layer",
        "RecurrentLayer",
        "cross_entropy",
        "embedding",
        "linear",
        "lstm",
        "mse_loss",
        "relu",
        "rnn",
    ]
