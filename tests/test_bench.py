"""bench.py: train, extract and stream benchmarks in tiny configurations, their JSON, the loader comparison,
and flags named and set as main.py's."""

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

import bench
import utils
from demo import make_demo_corpus
from model import Wav2Vec, Wav2VecConfig, sample_distractors
from training import build_optimizer, make_grad_scaler
from utils import autocast_context

TINY = ["--model", "wav2vec", "--channels", "16", "--batch-size", "2", "--segment-length", "4000",
        "--repeats", "1", "--warmup", "0", "--matmul-size", "128", "--device", "cpu"]


REPORTED = ("what", "model", "channels", "batch_size", "segment_length", "precision", "device",
            "seconds_per_step_median", "seconds_per_step_min", "seconds_per_step_max",
            "audio_seconds_per_second", "real_time_factor", "flops_per_step", "flops_method",
            "achieved_flops_per_second", "matmul_peak_flops_per_second", "mfu", "torch_version", "threads")


@pytest.mark.parametrize("what, objective, factor", [("train", True, 3), ("extract", False, 1)])
def test_model_benchmarks_write_every_field_with_analytic_flops(tmp_path, what, objective, factor):
    out = tmp_path / f"{what}.json"
    result = bench.main([*TINY, "--what", what, "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == result
    assert set(REPORTED) <= set(written)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16))
    assert written["flops_per_step"] == factor * 2 * sum(model.forward_flops(4000, objective).values())
    timings = [written[f"seconds_per_step_{name}"] for name in ("min", "median", "max")]
    assert 0 < timings[0] <= timings[1] <= timings[2]
    assert written["mfu"] == pytest.approx(
        written["achieved_flops_per_second"] / written["matmul_peak_flops_per_second"], abs=1e-3)


def test_bf16_and_fp32_training_steps_give_the_same_loss_on_the_same_distractors():
    torch.manual_seed(0)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=32))
    wav = torch.randn(2, 4000)
    negatives = sample_distractors(2, model.num_frames(4000), model.config.num_negatives,
                                   generator=torch.Generator().manual_seed(0))
    cpu, losses = torch.device("cpu"), {}
    for precision in ("fp32", "bf16"):
        same_weights = copy.deepcopy(model)
        optimizer, scaler = build_optimizer(same_weights, lr=1e-3), make_grad_scaler(cpu, precision)
        amp = autocast_context(cpu, precision)
        losses[precision] = bench.train_step(same_weights, optimizer, scaler, amp, wav, negatives).item()
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_training_on_a_data_folder_says_whether_the_loader_keeps_up(tmp_path):
    make_demo_corpus(tmp_path / "audio", num_speakers=1, files_per_speaker=2, seconds_per_file=1.0)
    result = bench.main([*TINY, "--what", "train", "--data-dir", str(tmp_path / "audio"), "--batches", "2"])
    assert result["input"] == str(tmp_path / "audio")
    assert result["loader_audio_seconds_per_second"] > 0
    assert result["loader_keeps_up"] == (
        result["loader_audio_seconds_per_second"] >= result["audio_seconds_per_second"])


def test_stream_benchmark_times_every_runtime_and_chunk_size_and_reports_the_device_budget():
    result = bench.main(["--what", "stream", "--presets", "wav2vec_tiny", "--chunk-ms", "10,30",
                         "--hops", "6", "--warmup", "1"])
    runtimes = [(row["chunk_ms"], row["runtime"], row["precision"]) for row in result["rows"]]
    assert runtimes == [(chunk, runtime, precision) for chunk in (10, 30)
                        for runtime, precision in (("pytorch", "fp32"), ("torchscript", "fp32"),
                                                   ("onnxruntime", "fp32"), ("onnxruntime", "int8"))]
    for row in result["rows"]:
        assert 0 < row["latency_ms_median"] <= row["latency_ms_p99"]
        assert row["real_time_factor"] == pytest.approx(row["chunk_ms"] / row["latency_ms_median"], rel=0.01,
                                                        abs=0.05)
        assert 0 < row["cpu_ms_median"] and row["real_time_factor_cpu"] == pytest.approx(
            row["chunk_ms"] / row["cpu_ms_median"], rel=0.01, abs=0.05)
        assert row["state_bytes"] == 7964 and row["parameters"] == 195_520


def test_mfu_peak_is_taken_in_the_precision_the_convolutions_use(backend_flags):
    utils.configure_backends(torch.device("cuda"))
    assert bench.peak_precision(torch.device("cuda"), "fp32") == "tf32"
    assert bench.peak_precision(torch.device("cuda"), "bf16") == "bf16"
    assert bench.peak_precision(torch.device("cpu"), "fp32") == "fp32"


def test_bench_names_its_flags_as_main_does():
    args = bench.parse_args(["--model", "wav2vec_large", "--packed-dir", "packed"])
    assert (args.model, args.packed_dir) == ("wav2vec_large", Path("packed"))
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "wav2vec"])


def test_channels_follow_the_preset_so_the_small_model_is_benchmarked_at_128():
    assert bench.parse_args(["--model", "wav2vec_small", "--channels", "16"]).channels == 16
    result = bench.main(["--what", "train", "--model", "wav2vec_small", "--batch-size", "2",
                         "--segment-length", "4000", "--repeats", "1", "--warmup", "0",
                         "--matmul-size", "128", "--device", "cpu"])
    assert result["channels"] == 128
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec_small"))
    assert result["flops_per_step"] == 3 * 2 * sum(model.forward_flops(4000).values())


def test_the_old_use_transforms_flag_still_turns_augmentation_on_and_warns(capsys):
    assert bench.parse_args(["--use-transforms"]).augment
    assert "warning: --use-transforms is now --augment" in capsys.readouterr().err


def test_on_cuda_the_train_benchmark_reports_peak_memory_and_the_host_syncs_in_a_step(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step(wav):  # a step with one .item(), as set_sync_debug_mode("warn") reports it
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
    report = bench.cuda_report(torch.device("cuda"), step, torch.zeros(1))
    assert (report["cuda_peak_memory_gb"], report["host_syncs_per_step"]) == (3.0, 1)
    assert modes == ["warn", "default"]  # and the debug mode is off again
    assert bench.cuda_report(torch.device("cpu"), step, torch.zeros(1)) == {}


def test_both_training_paths_take_turns_on_every_batch_and_report_their_ratio():
    result = bench.main([*TINY, "--what", "train", "--train-path", "both", "--repeats", "3"])
    assert (result["training_path"], result["plain_training_path"]) == ("fast", "plain")
    assert len(result["step_seconds"]) == len(result["plain_step_seconds"]) == 3
    assert result["fast_over_plain_median"] == pytest.approx(  # times are rounded to 0.1 ms in the report
        result["seconds_per_step_median"] / result["plain_seconds_per_step_median"], rel=0.05)
    plain_flops_per_second = result["flops_per_step"] / result["plain_seconds_per_step_median"]
    assert result["plain_mfu"] == pytest.approx(
        plain_flops_per_second / result["matmul_peak_flops_per_second"], abs=1e-3)
    calls = []
    seconds = bench.time_steps({name: lambda wav, name=name: calls.append(name) for name in "ab"},
                               [torch.zeros(1)] * 4, 1, torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then the order turns every batch
    assert [len(s) for s in seconds.values()] == [3, 3]


@pytest.mark.parametrize("flags, path", [((), "fast"), (("--train-path", "plain"), "plain"),
                                         (("--model", "wav2vec_tiny"), "plain")])
def test_the_train_benchmark_says_which_training_path_it_timed(flags, path):
    assert bench.main([*TINY, "--what", "train", *flags])["training_path"] == path
