import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# the real public data sets: ../shared/data beside the checkout (TINYGPT_SHARED_DATA elsewhere)
SHARED_DATA = Path(os.environ.get("TINYGPT_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip("shared data folder not present")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """nano models run fastest on one thread (no thread hand-offs, no contention on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
