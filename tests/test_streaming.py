"""Streaming extraction (model.Streamer, model.StreamingStep): frame by frame, equal to extract_features."""

import pytest
import torch

from model import StreamingStep, UserError, Wav2Vec, Wav2VecConfig

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


def test_push_refuses_a_batch():
    with pytest.raises(UserError, match="1-D"):
        streamable().streamer().push(torch.randn(2, 160))


def test_the_tiny_preset_streams_with_at_most_250k_parameters():
    model = Wav2Vec(Wav2VecConfig.preset("wav2vec_tiny"))
    assert model.num_parameters() == 244_736 <= 250_000  # 195,520 without the pre-training head
    assert model.config.norm == "layer"
    model.streamer()  # not refused
