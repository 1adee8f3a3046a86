import sys
from pathlib import Path

import pytest
import torch

# Tests import their reference helpers as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
