import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests import the top-level modules (model.py, data.py, ...) the way users do, from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio import write_tone  # noqa: E402 (after the path: the helpers import the modules)
from weights import random_checkpoint  # noqa: E402

from demo import make_demo_corpus, make_transcribed_corpus  # noqa: E402

# One intra-op thread, fixed so that timings and results are stable: tiny models gain nothing from a second,
# and on a 2-core machine shared with other jobs two OpenMP threads that wait for each other made 15 updates
# of a 32-channel model 10 times slower (4 s against 0.3 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_root_logging_and_threads():
    """Entry points reconfigure the root logger (train.log) and set torch's thread count (--threads): give the
    next test back what it had."""
    root, threads = logging.getLogger(), torch.get_num_threads()
    handlers, level = root.handlers[:], root.level
    yield
    torch.set_num_threads(threads)
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


@pytest.fixture
def backend_flags():
    """Give the next test back the process-wide backend flags."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.get_num_threads())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:3]
    torch.set_num_threads(saved[3])


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """6 files of 1 s from 2 speakers, with per-frame labels (read only)."""
    return make_demo_corpus(tmp_path_factory.mktemp("corpus"), num_speakers=2, files_per_speaker=3,
                            seconds_per_file=1.0)


@pytest.fixture(scope="session")
def transcribed(tmp_path_factory) -> Path:
    """48 files of 1.5 s from 2 speakers with transcripts of the demo's units in transcripts.tsv (`text`:
    words of the letters a e i o u s; `letters`: the same as space-separated tokens; read only)."""
    return make_transcribed_corpus(tmp_path_factory.mktemp("words"), num_speakers=2, files_per_speaker=24,
                                   seconds_per_file=1.5)


@pytest.fixture(scope="session")
def checkpoint16(tmp_path_factory) -> Path:
    """A 16-channel base network in main.py's checkpoint format."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", channels=16)


@pytest.fixture(scope="session")
def checkpoint32(tmp_path_factory) -> Path:
    """A 32-channel base network in main.py's checkpoint format."""
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", channels=32)


@pytest.fixture(scope="session")
def tones(tmp_path_factory) -> Path:
    """Two pitches (the label) said by three 'speakers', of different lengths: a task with a known answer
    (labels: scripts.TONE_LABELS; read only)."""
    folder = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)
    for hz in (300, 1500):
        for speaker in ("ann", "bob", "cy"):
            for i in range(8):
                write_tone(folder / f"{hz}hz_{speaker}_{i}.wav", hz * rng.uniform(0.95, 1.05),
                           rng.uniform(0.2, 0.5), rng)
    return folder
