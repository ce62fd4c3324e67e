import sys
from pathlib import Path

import torch

# Tests import the top-level modules (model.py, data.py, ...) the way users do, from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Two cores: keep intra-op threads fixed so timings and results are stable.
torch.set_num_threads(2)
