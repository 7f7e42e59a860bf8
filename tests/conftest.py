"""Session-scoped fixtures shared by the test modules (files are written once per session under pytest's tmp dir)."""

import os
import shutil
import tempfile

import pytest

from tests.fixtures import write_checkpoint, write_tokenizer_files

_LOAD_CACHE = None


def pytest_configure(config):
    """The load cache (qwen2vl.load_cache) of models the tests load goes to a directory of the session's, not the
    user's ~/.cache (servers started by the tests inherit it)."""
    global _LOAD_CACHE
    if "QWEN2VL_CACHE" not in os.environ:
        _LOAD_CACHE = os.environ["QWEN2VL_CACHE"] = tempfile.mkdtemp(prefix="qwen2vl-load-cache-")


def pytest_unconfigure(config):
    if _LOAD_CACHE is not None:
        shutil.rmtree(_LOAD_CACHE, ignore_errors=True)
        del os.environ["QWEN2VL_CACHE"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A directory with the official-style tokenizer files only."""
    return write_tokenizer_files(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """``checkpoint_factory(**write_checkpoint_kwargs) -> Path``, memoised for the session."""
    root = tmp_path_factory.mktemp("checkpoints")
    cache = {}

    def make(**kwargs):
        key = repr(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = write_checkpoint(root / f"ckpt{len(cache)}", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory):
    """The ``tiny`` variant in the official layout (tied embeddings)."""
    return checkpoint_factory(variant="tiny", layout="official")
