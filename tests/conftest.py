import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: the project must pass without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"realdata: {SHARED_DATA} is absent")
    return SHARED_DATA
