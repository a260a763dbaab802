import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# model hashes are cached on disk: the tests keep theirs out of the user's cache
os.environ["SDLOOM_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdloom-test-cache-")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (norm weights too), so a swapped key cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1)
                    + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0))
    return module


@pytest.fixture
def one_thread():
    """One torch thread for a test: several OpenMP threads on a shared, busy 2-core CPU spin
    against each other (training tests ran 20× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def randomize():
    return randomize_
