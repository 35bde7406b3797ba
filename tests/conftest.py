"""Shared fixtures: the bundled models, loaded once per session."""

import pytest


@pytest.fixture(scope="session")
def smol():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct."""
    from tq_mlx.models import load

    return load()


@pytest.fixture(scope="session")
def gemma():
    """(model, tokenizer) of the bundled Gemma-3-270M; skipped when its optional packages are missing."""
    from tq_mlx.models import load

    try:
        return load("gemma3-270m")
    except FileNotFoundError as e:
        pytest.skip(f"optional Gemma-3 packages not installed: {e}")
