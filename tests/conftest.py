import logging
import sys
from pathlib import Path

import pytest
import torch

# Tests import the top-level modules (model.py, data.py, ...) the way users do, from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Two cores: keep intra-op threads fixed so timings and results are stable.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def restore_root_logging():
    """Entry points reconfigure the root logger (train.log); give the next test back what it had."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
