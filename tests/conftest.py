"""Shared test setup: the `gpu` marker (skipped without CUDA) and a small CPU thread budget."""

import pytest
import torch


def pytest_configure(config):
    # Tiny test tensors are dominated by thread start-up and contention: one intra-op thread is much faster
    # on a 2-core machine and keeps results independent of the core count.
    torch.set_num_threads(1)
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still part of CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="session")
def _feature_cache_in_a_temporary_folder(tmp_path_factory):
    # Evaluations share a content-keyed feature cache under the user's cache folder; tests keep theirs apart.
    mp = pytest.MonkeyPatch()
    mp.setenv("DINOV2_REPRO_CACHE", str(tmp_path_factory.mktemp("dinov2_repro_cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
