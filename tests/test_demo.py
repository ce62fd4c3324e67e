"""The synthetic demo corpus (demo.py): deterministic, speech-like, labelled per file and per frame."""

import json

import numpy as np
import soundfile as sf

from data import find_audio_files
from demo import make_demo_corpus


def test_the_demo_corpus_is_deterministic_and_labelled(tmp_path):
    options = dict(num_speakers=2, files_per_speaker=2, seconds_per_file=1.0)
    first = make_demo_corpus(tmp_path / "a", seed=7, **options)
    second = make_demo_corpus(tmp_path / "b", seed=7, **options)
    other = make_demo_corpus(tmp_path / "c", seed=8, **options)
    files = [p.relative_to(first) for p in find_audio_files(first)]
    assert len(files) == 4 and all(p.parent.name == p.name.split("_")[0] for p in files)
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / files[0]).read_bytes() != (other / files[0]).read_bytes()

    rows = (first / "labels.tsv").read_text().splitlines()
    assert rows[0] == "path\tlabel\tspeaker"
    assert sorted(r.split("\t")[0] for r in rows[1:]) == sorted(f.as_posix() for f in files)
    names = json.loads((first / "frame_labels.json").read_text())["names"]
    for f in files:
        frames = np.load(first / f.with_suffix(".frames.npy"))
        assert len(frames) == sf.info(first / f).frames // 160 == 100
        assert frames.min() >= 0 and frames.max() < len(names) and len(set(frames.tolist())) > 1
