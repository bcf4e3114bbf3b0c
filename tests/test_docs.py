"""The guides' code blocks run, page by page, and print what the pages show."""

import contextlib
import io
import pathlib
import re

import jax
import pytest

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
GUIDES = sorted(p.name for p in DOCS.glob("*.md"))
# A python block, then optionally (after blank lines only) a text block with its output.
BLOCK = re.compile(r"```python\n(.*?)```(?:\s*\n```text\n(.*?)```)?", re.S)


def _blocks(page: str) -> list[tuple[str, str | None]]:
    return BLOCK.findall((DOCS / page).read_text())


def test_every_guide_is_in_the_site_navigation():
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    assert GUIDES and all(page in nav for page in GUIDES)


@pytest.mark.parametrize("page", GUIDES)
def test_guide_blocks_run(page, tmp_path, monkeypatch):
    blocks = _blocks(page)
    if any("import torch" in code for code, _ in blocks):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # blocks that write checkpoints write here
    namespace: dict = {"__name__": "__docs__"}
    for i, (code, expected) in enumerate(blocks):
        out = io.StringIO()
        # The guides run with JAX's defaults, as their readers do (the suite's
        # conftest makes promotion strict; optax's Adam needs the standard one).
        with (
            contextlib.redirect_stdout(out),
            jax.numpy_dtype_promotion("standard"),
            jax.numpy_rank_promotion("allow"),
        ):
            exec(compile(code, f"{page} block {i + 1}", "exec"), namespace)
        if expected:
            assert out.getvalue().split() == expected.split(), (page, i + 1)


MODULES = [
    "nn", "control", "models", "compile", "train",
    "checkpoint", "transforms", "interop", "parallel",
]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_api_reference_covers_every_public_name(module):
    """Each module has a reference page, and every public name a docstring."""
    import importlib  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    page = (DOCS / "api" / f"{module}.md").read_text()
    assert f"::: functorch_lite.{module}" in page
    mod = importlib.import_module(f"functorch_lite.{module}")
    assert (mod.__doc__ or "").strip(), module
    missing = []
    for name in mod.__all__:
        obj = getattr(mod, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)):
            continue  # constants are described in the module docstring
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") or not callable(member):
                    continue
                if not (getattr(member, "__doc__", None) or "").strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"functorch_lite.{module}: no docstring on {missing}"


def test_site_front_page_gives_the_ci_test_command():
    ci = (DOCS.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python -m pip install -e")
    assert ci in (DOCS / "index.md").read_text()
    assert ci in (DOCS.parent / "README.md").read_text()


def test_every_library_name_the_pages_mention_exists():
    """`fl.x.y` in the guides and the README names something real."""
    import functorch_lite as fl  # noqa: PLC0415

    pages = [*DOCS.glob("*.md"), DOCS.parent / "README.md"]
    stale = []
    for page in pages:
        for name in sorted(set(re.findall(r"\bfl((?:\.\w+)+)", page.read_text()))):
            obj = fl
            for part in name.strip(".").split("."):
                if not hasattr(obj, part):
                    stale.append(f"{page.name}: fl{name}")
                    break
                obj = getattr(obj, part)
    assert not stale, stale
