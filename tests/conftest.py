from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and on a busy machine threads that wait for each
# other make every small operation many times slower.
torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the project must pass without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    return SHARED_DATA
