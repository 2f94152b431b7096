"""pytest configuration: keep torch on the machine's 2 cores, and every test on the same thread count."""

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLI tests run `--threads N`, which sets torch's global thread count; put it back after each test so
    that no test depends on which ran before it (float results may depend on the thread count)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
