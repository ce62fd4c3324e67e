"""The wav2vec model (model.py) on tiny configs: its objective, the feature-extraction API, loading
checkpoints, and streaming (Streamer, StreamingStep) frame by frame, equal to extract_features."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from weights import recorded_load_locations

from model import (
    StreamingStep,
    UserError,
    Wav2Vec,
    Wav2VecConfig,
    sample_cross_distractors,
    sample_distractors,
)


def tiny(**overrides) -> Wav2Vec:
    torch.manual_seed(0)
    return Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=32, **overrides))


# ----- shapes, presets and configs ----------------------------------------------------------------

@pytest.mark.parametrize("preset", ["wav2vec", "wav2vec_large"])
def test_frame_count_equals_real_output_length(preset):
    model = Wav2Vec(Wav2VecConfig.preset(preset, channels=8))
    for length in [465, 466, 624, 625, 1000, 1599, 1600, 16000, 32000, 32159, 32160]:
        z = model.encoder(torch.zeros(1, length))
        assert z.shape[-1] == model.num_frames(length), length
    assert model.num_frames(16000) == 98 and model.num_frames(32000) == 198
    assert model.num_frames(464) == 0


@pytest.mark.parametrize("preset, expected", [("wav2vec", 15_491_072), ("wav2vec_large", 32_537_088),
                                              ("wav2vec_small", 972_800)])
def test_parameter_count_of_presets(preset, expected):
    assert Wav2Vec(Wav2VecConfig.preset(preset)).num_parameters() == expected


def test_step_projections_start_small_with_the_documented_bound():
    model = tiny()
    steps, c_out, c_in = model.predictions.weight.shape
    bound = math.sqrt(6 / (c_out * c_in + steps * c_out))  # xavier_uniform_ over the (K, C_z, C) tensor
    assert bound < 0.5 * math.sqrt(6 / (c_in + c_out))  # well below Xavier for one C_z x C matrix
    for w in model.predictions.weight:
        assert 0.9 * bound < w.abs().max().item() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    assert not model.predictions.bias.any()


def test_auto_offset_is_receptive_field_over_stride():
    config = Wav2VecConfig.preset("wav2vec")
    assert (config.receptive_field, config.stride, config.resolved_offset) == (465, 160, 3)
    assert Wav2VecConfig.preset("wav2vec", offset=1).resolved_offset == 1


def test_channels_override_scales_every_width():
    config = Wav2VecConfig.preset("wav2vec_large", channels=64)
    assert {c for c, _, _ in config.encoder_layers + config.context_layers} == {64}


def test_config_round_trips_through_a_plain_dict():
    config = Wav2VecConfig.preset("wav2vec_large", channels=48, loss_type="infonce", offset=2,
                                  norm="layer", causal_padding="zero", cross_negatives=3)
    d = config.to_dict()
    assert all(isinstance(layer, list) for layer in d["encoder_layers"])
    assert Wav2VecConfig.from_dict(d) == config


def test_config_rejects_unknown_choices_with_a_clear_error():
    with pytest.raises(UserError, match="loss_type"):
        Wav2VecConfig(loss_type="triplet")
    with pytest.raises(UserError, match="Unknown model"):
        Wav2VecConfig.preset("wav2vec3")


def test_context_is_causal_with_layer_norm():
    # With per-frame LayerNorm nothing looks ahead: changing samples from `cut` on leaves every
    # c(t) whose input window ends before `cut` untouched.
    model = tiny(norm="layer").eval()
    wav = torch.randn(1, 8000)
    cut = 4000
    changed = wav.clone()
    changed[:, cut:] = torch.randn(1, 8000 - cut)
    c1, c2 = model.extract_features(wav)["c"], model.extract_features(changed)["c"]
    last_clean = (cut - model.receptive_field) // model.config.stride  # window [160 t, 160 t + 465)
    assert torch.equal(c1[..., : last_clean + 1], c2[..., : last_clean + 1])
    assert not torch.allclose(c1[..., last_clean + 1:], c2[..., last_clean + 1:])


def test_group_norm_context_sees_the_future_through_its_statistics():
    # GroupNorm (the paper's default) normalizes over the whole crop, so a change at the end moves
    # early frames slightly: documented, and why norm="layer" exists for streaming use.
    model = tiny(norm="group").eval()
    wav = torch.randn(1, 8000)
    changed = wav.clone()
    changed[:, 6000:] *= 10
    c1, c2 = model.extract_features(wav)["c"], model.extract_features(changed)["c"]
    assert not torch.allclose(c1[..., :5], c2[..., :5])


# ----- distractors and the objective --------------------------------------------------------------

def test_distractors_never_equal_the_positive():
    generator = torch.Generator().manual_seed(0)
    for frames in [2, 3, 17, 200]:
        draws = sample_distractors(4, frames, 10, generator=generator)
        positive = torch.arange(frames).view(1, 1, frames)
        assert draws.shape == (4, 10, frames)
        assert not (draws == positive).any()
        assert draws.min() >= 0 and draws.max() < frames  # inside the utterance


def test_distractors_are_uniform_over_the_other_frames():
    draws = sample_distractors(64, 5, 50, generator=torch.Generator().manual_seed(1))
    counts = torch.stack([(draws[..., 2] == f).sum() for f in range(5)]).float()
    assert counts[2] == 0
    others = counts[[0, 1, 3, 4]] / counts.sum()
    assert torch.allclose(others, torch.full((4,), 0.25), atol=0.03)


def test_cross_distractors_index_the_batch_and_skip_the_positive():
    B, T = 3, 7
    draws = sample_cross_distractors(B, T, 20, generator=torch.Generator().manual_seed(0))
    own = (torch.arange(B) * T).view(B, 1, 1) + torch.arange(T).view(1, 1, T)
    assert not (draws == own).any()
    assert draws.min() >= 0 and draws.max() < B * T
    assert (draws // T != torch.arange(B).view(B, 1, 1)).any()  # some come from other utterances


def hand_scores(model: Wav2Vec, z, c, negatives):
    """Scores, one step and position at a time, the way the paper writes it."""
    cfg = model.config
    W, b = model.predictions.weight, model.predictions.bias
    B, _, T = z.shape
    rows = []
    for k in range(min(cfg.prediction_steps, T - cfg.resolved_offset)):
        for bi in range(B):
            for t in range(T - cfg.resolved_offset - k):
                u = t + cfg.resolved_offset + k
                h = W[k] @ c[bi, :, t] + b
                candidates = [u] + negatives[bi, :, u].tolist()
                rows.append(torch.stack([h @ z[bi, :, j] for j in candidates]))
    return torch.stack(rows)


@pytest.mark.parametrize("loss_type", ["contrastive", "infonce"])
def test_loss_equals_a_hand_computation(loss_type):
    model = tiny(prediction_steps=3, num_negatives=4, loss_type=loss_type).double()
    z = torch.randn(2, 32, 9, dtype=torch.double)
    c = torch.randn(2, 32, 9, dtype=torch.double)
    negatives = sample_distractors(2, 9, 4, generator=torch.Generator().manual_seed(0))
    loss, _ = model.objective(z, c, negatives)
    s = hand_scores(model, z, c, negatives)
    if loss_type == "contrastive":
        expected = -(F.logsigmoid(s[:, 0]).sum() + F.logsigmoid(-s[:, 1:]).sum()) / len(s)
    else:
        expected = -(s[:, 0] - torch.logsumexp(s, dim=1)).mean()
    assert torch.allclose(loss, expected, rtol=1e-10)


def test_accuracy_counts_positions_where_the_positive_scores_highest():
    model = tiny(prediction_steps=2, num_negatives=3).double()
    z, c = torch.randn(2, 32, 12, dtype=torch.double), torch.randn(2, 32, 12, dtype=torch.double)
    negatives = sample_distractors(2, 12, 3, generator=torch.Generator().manual_seed(0))
    _, metrics = model.objective(z, c, negatives)
    s = hand_scores(model, z, c, negatives)
    expected = (s[:, 0] > s[:, 1:].max(1).values).double().mean()  # no ties with random features
    assert torch.isclose(metrics["accuracy"].double(), expected)
    assert metrics["accuracy_per_step"].shape == (2,)
    assert torch.isclose(metrics["loss_bits"], _ / math.log(2))


def test_accuracy_per_step_counts_each_steps_own_positions():
    model = tiny(prediction_steps=3, num_negatives=3).double()
    z, c = torch.randn(2, 32, 10, dtype=torch.double), torch.randn(2, 32, 10, dtype=torch.double)
    negatives = sample_distractors(2, 10, 3, generator=torch.Generator().manual_seed(1))
    _, metrics = model.objective(z, c, negatives)
    s = hand_scores(model, z, c, negatives)  # rows: step 0 (2 x 7 positions), step 1 (2 x 6), step 2 (2 x 5)
    correct = (s[:, 0] > s[:, 1:].max(1).values).double()
    expected = torch.stack([part.mean() for part in correct.split([14, 12, 10])])
    torch.testing.assert_close(metrics["accuracy_per_step"].double(), expected)


def test_collapsed_features_score_zero_accuracy():
    model = tiny()
    z = torch.ones(2, 32, 40)
    _, metrics = model.objective(z, torch.ones(2, 32, 40))
    assert metrics["accuracy"] == 0
    assert (metrics["accuracy_per_step"] == 0).all()


@pytest.mark.parametrize("loss_type", ["contrastive", "infonce"])
def test_collapsed_loss_is_the_loss_at_the_best_constant_score(loss_type):
    model = tiny(num_negatives=10, cross_negatives=2, loss_type=loss_type).double()
    with torch.no_grad():  # every prediction is the bias b, every z the same vector
        model.predictions.weight.zero_()
        model.predictions.bias.fill_(1.0)
    best = -math.log(12)  # sigmoid(best) = 1 / 13: the share of positives among the 13 candidates
    z = torch.full((2, 32, 40), best / 32, dtype=torch.double)
    loss, _ = model.objective(z, torch.randn(2, 32, 40, dtype=torch.double))
    assert loss.item() == pytest.approx(model.collapsed_loss, rel=1e-9)
    if loss_type == "contrastive":  # and no other constant does better
        for shifted in (0.9 * z, 1.1 * z):
            assert model.objective(shifted, torch.randn(2, 32, 40, dtype=torch.double))[0] > loss


def test_steps_are_capped_by_the_crop_length():
    model = tiny()  # K = 12, offset 3
    _, metrics = model(torch.randn(2, 1600))  # 8 frames leave 5 steps
    assert metrics["accuracy_per_step"].shape == (5,)
    with pytest.raises(UserError, match="longer segments"):
        model(torch.randn(2, 800))  # 3 frames: nothing to predict at offset 3


def test_cross_utterance_negatives_add_candidates():
    model = tiny(num_negatives=2, cross_negatives=3)
    loss, metrics = model(torch.randn(3, 4000))
    assert torch.isfinite(loss) and metrics["accuracy"] <= 1


def test_a_few_optimizer_steps_on_one_batch_lower_the_loss():
    model = tiny()
    wav = torch.randn(4, 8000)
    negatives = sample_distractors(4, model.num_frames(8000), 10, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, _ = model(wav, negatives)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_scores_and_loss_stay_fp32_under_bf16_autocast():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(torch.randn(2, 4000))
        z = model.encoder(torch.randn(2, 4000))
    assert loss.dtype == torch.float32
    assert z.dtype == torch.bfloat16  # the convolutions themselves do run in bf16


# ----- feature extraction and checkpoints ---------------------------------------------------------

def test_extract_features_shapes_for_batched_and_single_waveforms():
    model = tiny().eval()
    feats = model.extract_features(torch.randn(3, 5000))
    T = model.num_frames(5000)
    assert feats["z"].shape == feats["c"].shape == (3, 32, T)
    assert model.extract_features(torch.randn(5000))["c"].shape == (1, 32, T)
    assert model.extract_features(torch.randn(model.receptive_field))["c"].shape == (1, 32, 1)
    assert not feats["c"].requires_grad


@pytest.mark.parametrize("wav, sample_rate, given", [("clip.wav", 16000, "the path clip.wav"),
                                                    (np.zeros(8000), 8000, "audio at 8000 Hz")])
def test_extract_features_sends_a_path_or_another_rate_to_load_waveform(wav, sample_rate, given):
    with pytest.raises(UserError, match=f"not {given}: load it with features.load_waveform"):
        tiny().extract_features(wav, sample_rate)


def test_extract_features_accepts_numpy_as_well_as_tensors():
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=16)).eval()
    wav = np.random.default_rng(0).standard_normal(4000)  # float64, as numpy makes it
    from_numpy = model.extract_features(wav)["c"]
    assert torch.equal(from_numpy, model.extract_features(torch.from_numpy(wav).float())["c"])


def test_extract_features_rejects_audio_shorter_than_one_frame():
    with pytest.raises(UserError, match="shorter than one frame"):
        tiny().extract_features(torch.randn(400))


def test_from_pretrained_reproduces_extract_features(tmp_path):
    model = tiny(norm="layer").eval()
    path = tmp_path / "tiny.pt"
    torch.save({"config": model.config.to_dict(), "model": model.state_dict(), "step": 3}, path)
    loaded = Wav2Vec.from_pretrained(path)
    wav = torch.randn(2, 6000)
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded.extract_features(wav)["c"], model.extract_features(wav)["c"])


def test_from_pretrained_reads_the_checkpoint_on_the_cpu_and_moves_only_the_model(checkpoint16, monkeypatch):
    # map_location went to torch.load: a training checkpoint's Adam moments went to the GPU with the weights.
    loads = recorded_load_locations(monkeypatch)
    model = Wav2Vec.from_pretrained(checkpoint16, map_location="meta")  # "meta" stands in for "cuda"
    assert loads == ["cpu"] and {p.device.type for p in model.parameters()} == {"meta"}


def test_from_pretrained_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="No checkpoint at"):
        Wav2Vec.from_pretrained(tmp_path / "nope.pt")


def test_a_pickle_the_safe_loader_cannot_read_is_named_without_advice_to_load_it_unsafely(tmp_path):
    (tmp_path / "odd.pt").write_bytes(b"\x80\x02X\x01\x00\x00\x00aQ.")  # a pickle with a string persistent id
    with pytest.raises(UserError, match="safe unpickler refused it: persistent_load id must be") as refused:
        Wav2Vec.from_pretrained(tmp_path / "odd.pt")
    assert "weights_only" not in str(refused.value)


def test_from_pretrained_foreign_file_is_a_clear_error(tmp_path):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a wav2vec checkpoint .* [(]not a PyTorch file"):
        Wav2Vec.from_pretrained(tmp_path / "notes.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="neither a checkpoint of this repository"):
        Wav2Vec.from_pretrained(tmp_path / "other.pt")


@pytest.mark.parametrize("preset", ["wav2vec", "wav2vec_large"])
def test_analytic_flops_equal_the_flop_counter(preset):
    from torch.utils.flop_counter import FlopCounterMode

    model = Wav2Vec(Wav2VecConfig.preset(preset, cross_negatives=2))
    for objective, run in [(True, model), (False, model.extract_features)]:
        with FlopCounterMode(display=False) as counter:
            run(torch.randn(2, 4000))
        assert counter.get_total_flops() == 2 * sum(model.forward_flops(4000, objective).values())


# ----- streaming ----------------------------------------------------------------------------------

LENGTH = 3500  # 20 frames of z: c reaches past the padding of all 9 context layers (19 frames)


SHORT = 1200  # for one push per few samples, which costs a Python call each


def streamable(preset: str = "wav2vec_tiny", **overrides) -> Wav2Vec:
    torch.manual_seed(0)
    return Wav2Vec(Wav2VecConfig.preset(preset, channels=12, norm="layer", **overrides)).eval()


def streamed(model: Wav2Vec, wav: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    streamer = model.streamer()
    outs = [streamer.push(wav[i:i + chunk]) for i in range(0, len(wav), chunk)]
    return {key: torch.cat([out[key] for out in outs], dim=2) for key in ("z", "c")}


def assert_equal_to_float32_rounding(got: dict, want: dict) -> None:
    for key in ("z", "c"):
        assert got[key].shape == want[key].shape
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 161, 1000])
@pytest.mark.parametrize("padding", ["replicate", "zero"])
def test_streaming_equals_offline_for_every_chunk_size_and_padding(chunk, padding):
    model = streamable(causal_padding=padding)
    wav = torch.randn(SHORT if chunk < 100 else LENGTH)
    assert_equal_to_float32_rounding(streamed(model, wav, chunk), model.extract_features(wav))


@pytest.mark.parametrize("seed", range(3))
def test_streaming_equals_offline_for_random_configs(seed):
    # Random layouts: the large one's pointwise encoder layers and kernels 2..13 included, skip connections
    # and log compression on or off, odd chunk sizes.
    rng = torch.Generator().manual_seed(seed)
    pick = lambda options: options[int(torch.randint(len(options), (1,), generator=rng))]  # noqa: E731
    model = streamable(pick(["wav2vec_tiny", "wav2vec_large"]), causal_padding=pick(["replicate", "zero"]),
                       skip_connections=pick([True, False]), log_compression=pick([True, False]))
    wav = torch.randn(LENGTH + int(torch.randint(0, 500, (1,), generator=rng)), generator=rng)
    chunk = pick([17, 99, 333, 1601])
    assert_equal_to_float32_rounding(streamed(model, wav, chunk), model.extract_features(wav))


def test_a_frame_is_out_with_the_last_sample_of_its_receptive_field():
    model, wav = streamable(), torch.randn(800)
    streamer, frames = model.streamer(), 0
    for count in range(1, len(wav) + 1):
        out = streamer.push(wav[count - 1:count])
        assert out["z"].shape[-1] == out["c"].shape[-1]
        frames += out["z"].shape[-1]
        assert frames == model.num_frames(count)  # frame t needs samples up to 160 t + 464, and no more


def test_a_group_norm_model_is_refused_with_what_to_train_instead():
    torch.manual_seed(0)
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec", channels=8))
    with pytest.raises(UserError, match="cannot stream.*wav2vec_tiny"):
        model.streamer()
    with pytest.raises(UserError, match="cannot stream"):
        StreamingStep(model)


@pytest.mark.parametrize("hops", [1, 2, 5])  # frame 0 in the third call, at the start, inside the first
def test_the_fixed_shape_step_gives_offline_frames_after_its_warmup(hops):
    model = streamable(skip_connections=True, log_compression=True)
    step, wav = StreamingStep(model, hops), torch.randn(LENGTH)
    samples = hops * model.config.stride
    state, zs, cs = step.initial_state(), [], []
    with torch.no_grad():
        for start in range(0, len(wav) - samples + 1, samples):
            z, c, *state = step(wav[None, start:start + samples], *state)
            zs.append(z)
            cs.append(c)
    got = {"z": torch.cat(zs, 2)[..., step.warmup_hops:], "c": torch.cat(cs, 2)[..., step.warmup_hops:]}
    offline = model.extract_features(wav)
    frames = got["z"].shape[-1]
    assert frames == model.num_frames(len(zs) * samples)  # every frame the pushed hops complete
    assert_equal_to_float32_rounding(got, {key: value[..., :frames] for key, value in offline.items()})


def test_streaming_makes_its_state_on_the_models_device_not_the_default_one():
    # On a GPU the frame position was made on the CPU, the default device, and index_select refused it: a
    # CPU model under a "meta" default device fails the same way, and needs no GPU.
    model, wav = streamable(), torch.randn(LENGTH)
    offline, step = model.extract_features(wav), StreamingStep(model)
    with torch.device("meta"), torch.no_grad():
        pushed = streamed(model, wav, 1000)
        state = step.initial_state()
        step(wav[None, :model.config.stride], *state)
    assert_equal_to_float32_rounding(pushed, offline)
    assert {tensor.device.type for tensor in state} == {"cpu"}


def test_the_streaming_step_starts_the_context_network_after_its_warmup():
    # Frame 0 ends at sample 465: complete in the third hop.
    assert StreamingStep(streamable()).warmup_hops == 2


def test_push_refuses_a_batch():
    with pytest.raises(UserError, match="1-D"):
        streamable().streamer().push(torch.randn(2, 160))


def test_the_tiny_preset_streams_with_at_most_250k_parameters():
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec_tiny"))
    assert model.num_parameters() == 244_736 <= 250_000  # 195,520 without the pre-training head
    assert model.config.norm == "layer"
    model.streamer()  # not refused
