"""Shared fixtures: the bundled models, loaded once per session."""

import signal

import pytest


def pytest_configure(config):
    """Ctrl-C reaches the subprocesses the tests interrupt (tq-server, tq-chat): a shell that starts pytest
    in the background (`cmd &`, nohup) ignores SIGINT, and children would inherit that and never stop."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
