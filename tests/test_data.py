"""The audio pipeline (data.py): formats, resampling, crops, the manifest, bad files, sampling, workers, the
packed corpus."""

import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from scripts import REPO
from torch.utils.data import Dataset

import data
from data import (
    SAMPLE_RATE,
    CropDataset,
    EpochSampler,
    PackedCropDataset,
    build_manifest,
    change_speed,
    find_audio_files,
    load_audio,
    make_loader,
    prepare_packed_corpus,
    split_manifest,
)
from demo import make_demo_corpus
from model import UserError


def tone(seconds: float, rate: int, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    """A sine, (frames, channels) float32, each channel at half the amplitude of the one before."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t)
    return np.stack([wave / 2**c for c in range(channels)], axis=1).astype(np.float32)


def write(path, audio: np.ndarray, rate: int, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, audio, rate, **kwargs)
    return path


def peak_hz(wav: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(wav))


# ----- formats and resampling ---------------------------------------------------------------------

LOSSLESS = {"wav": "PCM_16", "flac": "PCM_16"}


LOSSY = {"ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}


@pytest.mark.parametrize("extension", [*LOSSLESS, *LOSSY])
def test_every_soundfile_format_round_trips_at_16k(tmp_path, extension):
    audio = tone(1.0, SAMPLE_RATE)
    subtype = {**LOSSLESS, **LOSSY}[extension]
    try:
        write(tmp_path / f"a.{extension}", audio, SAMPLE_RATE, subtype=subtype)
    except (sf.SoundFileError, TypeError, ValueError) as error:
        pytest.skip(f"this libsndfile cannot write {extension}: {error}")
    wav = load_audio(tmp_path / f"a.{extension}")
    assert wav.dtype == np.float32 and wav.shape == (SAMPLE_RATE,)
    if extension in LOSSLESS:
        np.testing.assert_allclose(wav, audio[:, 0], atol=1e-4)
    else:
        assert peak_hz(wav) == pytest.approx(440, abs=2)


def test_m4a_from_pyav_decodes_to_16k_mono(tmp_path):
    av = pytest.importorskip("av")
    stereo = tone(1.0, 44100, channels=2).T  # (channels, frames)
    try:
        with av.open(str(tmp_path / "memo.m4a"), "w", format="mp4") as container:
            stream = container.add_stream("aac", rate=44100, layout="stereo")
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo), format="fltp", layout="stereo")
            frame.sample_rate = 44100
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                container.mux(packet)
    except av.FFmpegError as error:
        pytest.skip(f"this FFmpeg cannot encode AAC: {error}")
    wav = load_audio(tmp_path / "memo.m4a")
    # AAC adds encoder delay and pads the last frame: up to ~2 x 1024 samples at 44.1 kHz, 750 at 16 kHz.
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert SAMPLE_RATE <= len(wav) <= SAMPLE_RATE + 750
    assert peak_hz(wav) == pytest.approx(440, abs=2)


def test_m4a_without_pyav_is_one_clear_user_error_not_a_skipped_file(tmp_path, monkeypatch):
    (tmp_path / "memo.m4a").write_bytes(bytes(100))
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now raises ImportError
    with pytest.raises(UserError, match="pip install av") as error:
        load_audio(tmp_path / "memo.m4a")
    assert not isinstance(error.value, data.AudioReadError)


@pytest.mark.parametrize("rate, channels", [(44100, 2), (8000, 1)])
def test_other_rates_and_stereo_come_out_16k_mono_with_the_right_length(tmp_path, rate, channels):
    write(tmp_path / "a.wav", tone(1.5, rate, channels=channels), rate, subtype="FLOAT")
    wav = load_audio(tmp_path / "a.wav")
    assert wav.shape == (24000,)
    mean_amplitude = 0.5 * np.mean([1 / 2**c for c in range(channels)])  # 0.375 for stereo: channels averaged
    assert np.abs(wav[2000:-2000]).max() == pytest.approx(mean_amplitude, rel=0.01)
    assert peak_hz(wav) == pytest.approx(440, abs=1)


# ----- crops --------------------------------------------------------------------------------------

def test_crops_of_a_16k_file_are_exact_slices_of_it(tmp_path):
    ramp = (np.arange(20000) - 10000).astype(np.int16)  # every sample tells where it comes from
    write(tmp_path / "ramp.wav", ramp, SAMPLE_RATE)
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=4000)
    starts = set()
    for epoch in range(5):
        crop = (ds[(0, epoch)].numpy() * 32768).astype(np.int16)
        start = int(crop[0]) + 10000
        np.testing.assert_array_equal(crop, ramp[start:start + 4000])
        starts.add(start)
    assert len(starts) > 1  # the offset is random per epoch


def test_crops_of_an_8k_file_match_the_resampled_whole_file(tmp_path):
    ramp = np.linspace(-0.9, 0.9, 16000, dtype=np.float32)  # 2 s at 8 kHz, increasing
    write(tmp_path / "ramp.wav", ramp, 8000, subtype="FLOAT")
    whole = load_audio(tmp_path / "ramp.wav")
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=4000)
    for epoch in range(3):
        crop = ds[(0, epoch)].numpy()
        start = int(np.argmin(np.abs(whole - crop[0])))
        np.testing.assert_allclose(crop, whole[start:start + 4000], atol=1e-6)
        ideal = np.interp(np.arange(start, start + 4000) / 2, np.arange(16000), ramp)  # the 16 kHz ramp
        np.testing.assert_allclose(crop, ideal, atol=1e-3)


def test_validation_crop_is_the_centre_whatever_the_epoch(tmp_path):
    ramp = (np.arange(10000) - 5000).astype(np.int16)
    write(tmp_path / "ramp.wav", ramp, SAMPLE_RATE)
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=4000, train=False, transforms=True)
    for epoch in range(3):
        np.testing.assert_array_equal((ds[(0, epoch)].numpy() * 32768).astype(np.int16), ramp[3000:7000])


def test_transforms_change_training_crops_reproducibly(tmp_path):
    write(tmp_path / "a.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    entries = build_manifest(tmp_path)
    plain = CropDataset(tmp_path, entries, segment_length=8000, seed=3)
    augmented = CropDataset(tmp_path, entries, segment_length=8000, transforms=True, seed=3)
    assert not torch.allclose(plain[(0, 1)], augmented[(0, 1)], atol=1e-3)
    assert torch.equal(augmented[(0, 1)], augmented[(0, 1)])
    assert not torch.equal(augmented[(0, 1)], augmented[(0, 2)])


def test_speed_perturbation_scales_pitch_and_duration_by_one_factor():
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    wav = np.sin(2 * np.pi * 500 * t).astype(np.float32)
    for seed in range(5):
        faster = change_speed(wav, np.random.default_rng(seed), max_change=0.2)
        factor = len(wav) / len(faster)
        assert 0.8 <= factor <= 1.2 and faster.dtype == np.float32
        spectrum = np.abs(np.fft.rfft(faster))
        peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(faster)
        assert abs(peak_hz - 500 * factor) < 3


def test_speed_perturbation_never_leaves_fewer_samples_than_asked():
    wav = np.random.default_rng(0).standard_normal(470).astype(np.float32)
    lengths = [len(change_speed(wav, np.random.default_rng(seed), 0.45, min_length=465))
               for seed in range(50)]
    assert min(lengths) >= 465 and max(lengths) > 470  # slowed down freely, sped up only to the limit


@pytest.mark.parametrize("pad_short", [False, True])
def test_short_files_are_counted_and_skipped_or_padded(tmp_path, caplog, pad_short):
    write(tmp_path / "long.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    write(tmp_path / "short.wav", tone(0.1, SAMPLE_RATE), SAMPLE_RATE)
    with caplog.at_level(logging.INFO, logger="data"):
        ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=8000, pad_short=pad_short)
    assert "1 of 2 files are shorter than one crop" in caplog.text
    assert len(ds) == (2 if pad_short else 1)
    if pad_short:
        crop = ds[1].numpy()  # short.wav sorts second
        assert np.abs(crop[:1600]).max() > 0.1 and not crop[1600:].any()


def test_files_shorter_than_one_crop_are_met_with_the_flags_that_keep_them_and_the_numbers(tmp_path, caplog):
    for i, seconds in enumerate((0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 3.0)):
        write(tmp_path / f"{i}.wav", tone(seconds, SAMPLE_RATE), SAMPLE_RATE)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=32000)
    advice = "--pad-short keeps them (zero-padded), or --segment-length 4800 keeps 90% of the files whole"
    assert f"9 of 10 files are shorter than one crop (32000 samples, 2.00 s): skipped; {advice}" \
        in caplog.text
    with pytest.raises(UserError, match="9 files were skipped as shorter than one crop: --pad-short") \
            as error:
        make_loader(ds, EpochSampler(len(ds)), batch_size=2)
    assert "--segment-length 4800" in str(error.value) and "--batch-size" not in str(error.value)
    with pytest.raises(UserError, match=r"All 10 files .* \(the longest has 48000\): --pad-short"):
        CropDataset(tmp_path, build_manifest(tmp_path), segment_length=64000)


def test_a_few_short_files_in_a_long_corpus_are_not_met_with_a_longer_crop(tmp_path, caplog):
    for i, seconds in enumerate((0.5,) + (3.0,) * 19):
        write(tmp_path / f"{i}.wav", tone(seconds, SAMPLE_RATE), SAMPLE_RATE)
    with caplog.at_level(logging.WARNING, logger="data"):
        CropDataset(tmp_path, build_manifest(tmp_path), segment_length=32000)
    assert "1 of 20 files are shorter than one crop (32000 samples, 2.00 s): skipped; --pad-short keeps " \
           "them (zero-padded)." in caplog.text
    assert "--segment-length" not in caplog.text  # 90% of the files are whole with this crop already


# ----- bad input ----------------------------------------------------------------------------------

def write_bad_files(folder):
    """A corrupt FLAC, an empty WAV, a text file called .wav and a WAV with zero frames."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.flac").write_bytes(np.random.default_rng(0).bytes(4000))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "notes.wav").write_text("not audio at all\n" * 50)
    write(folder / "silent.wav", np.zeros((0, 1), np.float32), SAMPLE_RATE)
    return ["corrupt.flac", "empty.wav", "notes.wav", "silent.wav"]


def test_unreadable_files_are_skipped_at_scan_time_with_a_reason(tmp_path, caplog):
    write(tmp_path / "good.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    bad = write_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="data"):
        entries = build_manifest(tmp_path)
    assert [e.path for e in entries] == ["good.wav"]
    for name in bad:
        (line,) = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert line.startswith("Skipping") and len(line) > len(f"Skipping {tmp_path / name}: ")


def test_a_file_that_breaks_after_the_scan_is_logged_once_and_replaced_by_the_next(tmp_path, caplog):
    write(tmp_path / "a.flac", tone(2.0, SAMPLE_RATE, hz=440), SAMPLE_RATE)
    write(tmp_path / "b.flac", tone(2.0, SAMPLE_RATE, hz=1000), SAMPLE_RATE)
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=8000)
    flac = (tmp_path / "a.flac").read_bytes()
    (tmp_path / "a.flac").write_bytes(flac[:len(flac) // 3])  # truncated: the header still promises 2 s
    with caplog.at_level(logging.WARNING, logger="data"):
        crops = [ds[(0, epoch)] for epoch in range(4)]
    assert all(c.shape == (8000,) and peak_hz(c.numpy()) == pytest.approx(1000, abs=2) for c in crops)
    assert ds.num_read_errors == 1
    assert sum("a.flac" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_a_file_with_non_finite_samples_is_skipped_named_and_counted_like_a_corrupt_one(tmp_path, caplog,
                                                                                       bad_value):
    write(tmp_path / "a.wav", tone(1.0, SAMPLE_RATE, hz=440), SAMPLE_RATE, subtype="FLOAT")
    poisoned = tone(1.0, SAMPLE_RATE, hz=1000)
    poisoned[::100] = bad_value
    write(tmp_path / "b.wav", poisoned, SAMPLE_RATE, subtype="FLOAT")
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=8000)
    with caplog.at_level(logging.WARNING, logger="data"):
        crops = [ds[(i, epoch)] for i in range(2) for epoch in range(3)]
    assert all(torch.isfinite(c).all() and peak_hz(c.numpy()) == pytest.approx(440, abs=2) for c in crops)
    assert ds.num_read_errors == 1
    (line,) = [r.getMessage() for r in caplog.records if "b.wav" in r.getMessage()]
    assert "NaN or infinite" in line
    with pytest.raises(UserError, match="NaN or infinite"):
        load_audio(tmp_path / "b.wav")


def test_a_folder_without_audio_is_one_clear_user_error(tmp_path):
    (tmp_path / "readme.txt").write_text("no audio here")
    with pytest.raises(UserError, match="No audio files"):
        build_manifest(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        build_manifest(tmp_path / "missing")


def test_a_folder_of_only_unreadable_files_is_a_user_error(tmp_path):
    write_bad_files(tmp_path)
    with pytest.raises(UserError, match="None of the 4 audio files"):
        build_manifest(tmp_path)


# ----- discovery and the manifest -----------------------------------------------------------------

def test_discovery_is_recursive_case_insensitive_and_sorted(tmp_path):
    for name in ["b/x.WAV", "a.flac", "b/a/y.Mp3", "c.ogg", "d.m4a", "e.txt", ".hidden/z.wav", "._a.wav"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_audio_files(tmp_path)]
    assert found == ["a.flac", "b/a/y.Mp3", "b/x.WAV", "c.ogg", "d.m4a"]


def test_symlinked_folders_are_followed_each_real_folder_once_and_a_loop_ends(tmp_path):
    for speaker in ("ann", "bob"):
        (tmp_path / "store" / speaker).mkdir(parents=True)
        (tmp_path / "store" / speaker / "1.wav").write_bytes(b"")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for speaker in ("ann", "bob"):
        (corpus / speaker).symlink_to(tmp_path / "store" / speaker, target_is_directory=True)
    (corpus / "ann_again").symlink_to(tmp_path / "store" / "ann", target_is_directory=True)
    (tmp_path / "store" / "bob" / "up").symlink_to(corpus, target_is_directory=True)  # a loop
    found = [p.relative_to(corpus).as_posix() for p in find_audio_files(corpus)]
    assert found == ["ann/1.wav", "bob/1.wav"]


@pytest.fixture
def counted_probes(monkeypatch):
    """The paths data.probe_audio opened, in order."""
    opened = []
    real_probe = data.probe_audio

    def probe(path):
        opened.append(path.name)
        return real_probe(path)

    monkeypatch.setattr(data, "probe_audio", probe)
    return opened


def test_the_manifest_is_reused_without_opening_any_file(tmp_path, counted_probes):
    for k in range(3):
        write(tmp_path / f"{k}.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    first = build_manifest(tmp_path)
    assert len(counted_probes) == 3 and (tmp_path / data.MANIFEST_NAME).is_file()
    assert build_manifest(tmp_path) == first
    assert len(counted_probes) == 3


def test_the_manifest_notices_added_removed_and_changed_files(tmp_path, counted_probes):
    for k in range(3):
        write(tmp_path / f"{k}.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    build_manifest(tmp_path)
    counted_probes.clear()
    (tmp_path / "0.wav").unlink()
    write(tmp_path / "1.wav", tone(2.0, SAMPLE_RATE), SAMPLE_RATE)
    os.utime(tmp_path / "1.wav", ns=(1, 1))  # a distinct mtime even on coarse-clock file systems
    write(tmp_path / "3.wav", tone(0.5, 8000), 8000)
    entries = build_manifest(tmp_path)
    assert sorted(counted_probes) == ["1.wav", "3.wav"]
    assert [(e.path, e.frames, e.sample_rate) for e in entries] == [
        ("1.wav", 32000, SAMPLE_RATE), ("2.wav", 16000, SAMPLE_RATE), ("3.wav", 4000, 8000)]


def test_the_manifest_goes_to_cache_dir_when_given(tmp_path):
    write(tmp_path / "audio" / "a.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    build_manifest(tmp_path / "audio", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "audio" / data.MANIFEST_NAME).exists()
    assert len(list((tmp_path / "cache").glob("audio-*.tsv"))) == 1


def test_an_interrupted_scan_stops_without_scanning_the_files_still_queued(tmp_path, monkeypatch):
    for i in range(200):
        (tmp_path / f"{i}.wav").write_bytes(b"")
    scanned = []

    def slow_unreadable(path, *job):
        scanned.append(path)
        time.sleep(0.01)
        return data.AudioReadError(path, "unreadable")

    def ctrl_c(*args, **kwargs):  # Ctrl-C while the main thread handles a scanned file
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_scan", slow_unreadable)
    monkeypatch.setattr(data.logger, "warning", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build_manifest(tmp_path)
    assert len(scanned) < 50


def test_the_split_is_stable_and_keeps_a_file_on_each_side(tmp_path):
    entries = [data.ManifestEntry(f"s{k}/{k}.wav", 16000, SAMPLE_RATE, 1, 0, 0) for k in range(200)]
    train, valid = split_manifest(entries, valid_fraction=0.1)
    assert 5 < len(valid) < 40 and len(train) + len(valid) == 200
    assert split_manifest(entries[::-1], 0.1)[1] == valid[::-1]  # by path, not by position
    assert split_manifest(entries[50:], 0.1)[1] == [e for e in valid if e in entries[50:]]
    for pair in [entries[:2], entries[2:4], entries[4:6]]:
        train, valid = split_manifest(pair, valid_fraction=0.01)
        assert len(train) == len(valid) == 1


# ----- sampling and loading -----------------------------------------------------------------------

def test_the_sampler_gives_every_rank_the_same_count_and_resumes_exactly():
    ranks = [EpochSampler(10, seed=1, rank=r, world_size=3, drop_last=False) for r in range(3)]
    keys = [list(s) for s in ranks]
    assert [len(k) for k in keys] == [4, 4, 4] and [len(s) for s in ranks] == [4, 4, 4]
    assert {i for k in keys for i, _ in k} == set(range(10))
    assert [len(list(EpochSampler(10, rank=r, world_size=3))) for r in range(3)] == [3, 3, 3]
    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    order = list(sampler)
    assert order != list(EpochSampler(10, seed=1)) and {e for _, e in order} == {2}
    sampler.set_epoch(2, start=7)
    assert list(sampler) == order[7:] and len(sampler) == 3


@pytest.mark.parametrize("world_size, start", [(1, 6), (2, 6), (3, 6), (2, 7), (4, 12)])
def test_a_resume_point_in_crops_serves_the_rest_of_the_epoch_whatever_the_number_of_ranks(world_size, start):
    whole = EpochSampler(12, seed=1)
    whole.set_epoch(3)
    order = [index for index, _ in whole]
    ranks = [EpochSampler(12, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    for sampler in ranks:
        sampler.set_epoch(3, start=start)
    served = [[index for index, _ in sampler] for sampler in ranks]
    dealt = [index for turn in zip(*served, strict=True) for index in turn]  # rank 0, 1, ... in turn
    assert dealt == order[start:start + (12 - start) // world_size * world_size]
    assert [len(sampler) for sampler in ranks] == [len(keys) for keys in served]


@pytest.mark.slow
def test_the_loader_gives_the_same_batches_whatever_the_worker_count(tmp_path):
    make_demo_corpus(tmp_path, num_speakers=2, files_per_speaker=3, seconds_per_file=1.0)
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=4000, transforms=True)

    def batches(num_workers):
        sampler = EpochSampler(len(ds), seed=0)
        sampler.set_epoch(1)
        return torch.cat(list(make_loader(ds, sampler, batch_size=2, num_workers=num_workers)))

    single = batches(0)
    assert single.shape == (6, 4000)
    assert torch.equal(single, batches(2))


class WorkerRandom(Dataset):
    """What numpy's global generator gives in whichever worker serves the key."""

    train = False

    def __len__(self):
        return 4

    def __getitem__(self, key):
        return torch.tensor([np.random.random(), torch.utils.data.get_worker_info().id])


@pytest.mark.slow
def test_each_worker_is_seeded_differently_and_reproducibly():
    def draws(seed):
        loader = make_loader(WorkerRandom(), EpochSampler(4, shuffle=False), 1, num_workers=2, seed=seed)
        return torch.cat(list(loader))

    first = draws(0)
    worker_ids = first[:, 1].tolist()
    assert sorted(worker_ids) == [0, 0, 1, 1]
    by_worker = {w: first[first[:, 1] == w, 0] for w in (0, 1)}
    assert not torch.equal(by_worker[0], by_worker[1])
    assert torch.equal(draws(0), first)
    assert not torch.equal(draws(1)[:, 0], first[:, 0])


def test_a_training_set_smaller_than_one_batch_is_a_user_error(tmp_path):
    write(tmp_path / "a.wav", tone(1.0, SAMPLE_RATE), SAMPLE_RATE)
    ds = CropDataset(tmp_path, build_manifest(tmp_path), segment_length=4000)
    with pytest.raises(UserError, match="fewer than one batch"):
        make_loader(ds, EpochSampler(len(ds)), batch_size=2)


# ----- loader workers and signals (separate processes) --------------------------------------------

LOADER_SCRIPT = """
import os, signal, sys
import torch
from torch.utils.data import Dataset
import data

class Keys(Dataset):
    train = False
    def __len__(self):
        return 4
    def __getitem__(self, key):
        return torch.tensor([key])

loader = data.make_loader(Keys(), data.EpochSampler(4, shuffle=False), 1, num_workers=2)
"""


SIGNAL_AS_WORKERS_START = LOADER_SCRIPT + """
received = []
signal.signal(signal.SIGTERM, lambda *_: received.append("SIGTERM"))
init = data._init_worker
def signalled_as_it_starts(worker_id, **kwargs):
    if worker_id == 0:
        os.killpg(0, signal.SIGTERM)  # the group's SIGTERM, just as the first worker starts
    init(worker_id, **kwargs)
data._init_worker = signalled_as_it_starts
loader = data.make_loader(Keys(), data.EpochSampler(4, shuffle=False), 1, num_workers=2)
print(len(list(loader)), received)
"""


def run_in_own_group(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=60, start_new_session=True)


@pytest.mark.slow
def test_a_group_signal_while_loader_workers_start_reaches_the_main_process_only():
    # A worker forked just before it ignores the signal used to die of it: "DataLoader worker killed".
    result = run_in_own_group(SIGNAL_AS_WORKERS_START)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "4 ['SIGTERM']"  # every batch served, the signal taken once


@pytest.mark.slow
def test_loader_workers_still_running_at_exit_do_not_hold_the_process_up():
    # The workers ignore SIGTERM, so multiprocessing's exit hook (terminate, then join) used to wait forever.
    script = LOADER_SCRIPT + "batches = iter(loader)\nnext(batches)\nsys.exit(3)\n"
    assert run_in_own_group(script).returncode == 3


# ----- packed corpus ------------------------------------------------------------------------------

def test_the_packed_corpus_gives_the_crops_of_the_on_the_fly_dataset(tmp_path, monkeypatch):
    make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=2, seconds_per_file=1.0)
    write(tmp_path / "audio" / "phone.wav", tone(1.0, 8000), 8000)
    write(tmp_path / "audio" / "short.wav", tone(0.1, 44100, channels=2), 44100)
    entries = build_manifest(tmp_path / "audio")
    packed = prepare_packed_corpus(tmp_path / "audio", entries, tmp_path / "packed")
    for train in (True, False):
        options = dict(segment_length=4000, train=train, transforms=True, pad_short=True, seed=5)
        live = CropDataset(tmp_path / "audio", entries, **options)
        sliced = PackedCropDataset(packed, **options)
        assert len(live) == len(sliced) == 4
        for key in [(i, e) for i in range(4) for e in range(2)]:
            torch.testing.assert_close(sliced[key], live[key], atol=1e-4, rtol=0)

    monkeypatch.setattr(data, "load_audio", None)  # a second preparation must decode nothing
    assert prepare_packed_corpus(tmp_path / "audio", entries, tmp_path / "packed") == packed


def test_packing_leaves_the_temporary_files_of_other_processes_alone(tmp_path):
    # Another node packing into the same shared folder: its half-written file must survive ours.
    make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=2, seconds_per_file=1.0)
    entries = build_manifest(tmp_path / "audio", cache_dir=tmp_path / "cache")
    others = [tmp_path / "packed" / ".audio.int16.tmp", tmp_path / "packed" / ".index.json.tmp"]
    for other in others:
        other.parent.mkdir(exist_ok=True)
        other.write_bytes(b"another process")
    prepare_packed_corpus(tmp_path / "audio", entries, tmp_path / "packed")
    assert [other.read_bytes() for other in others] == [b"another process"] * 2
    assert len(PackedCropDataset(tmp_path / "packed", segment_length=4000)) == 2


def test_an_unwritable_packed_folder_is_a_clear_error_before_any_decoding(tmp_path, monkeypatch):
    make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=2, seconds_per_file=1.0)
    entries = build_manifest(tmp_path / "audio", cache_dir=tmp_path / "cache")
    (tmp_path / "file").write_text("")  # a folder under a file cannot be made, even by root
    monkeypatch.setattr(data, "load_audio", None)  # decoding anything would raise a TypeError
    with pytest.raises(UserError, match="Cannot write the packed corpus.*--packed-dir"):
        prepare_packed_corpus(tmp_path / "audio", entries, tmp_path / "file" / "packed")
