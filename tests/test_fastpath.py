"""fastpath.py: the time-major training step gives model.py's loss and gradients; only training takes it."""

import contextlib
import copy
import types

import pytest
import torch
import torch.nn.functional as F

from fastpath import FastTraining, GroupNormTimeMajor, TimeMajorConv, encode_time_major, fast_or_plain
from model import Wav2Vec, Wav2VecConfig, sample_distractors

# (preset, overrides, batch, samples): every length leaves a remainder at some stride (465 + 160 t exactly
# would leave none); the large layout has pointwise encoder layers, log compression and kernels 2..13.
CASES = {
    "small, batch 1": ("wav2vec_small", {}, 1, 4000 + 123),
    "base": ("wav2vec", {}, 2, 3000 + 77),
    "base without skip connections": ("wav2vec", {"skip_connections": False}, 2, 3001),
    "large layout": ("wav2vec_large", {}, 2, 3000 + 5),
    "binary loss, cross-utterance distractors": ("wav2vec_small", {"loss_type": "contrastive",
                                                                    "cross_negatives": 2}, 2, 3333),
}


def tiny_model(preset: str, **overrides) -> Wav2Vec:
    torch.manual_seed(0)
    model = Wav2Vec(Wav2VecConfig.preset(preset, channels=12, **overrides)).train()
    with torch.no_grad():
        model.predictions.weight.mul_(30)  # scores far from 0, as after some training
    return model


def inputs(model: Wav2Vec, batch: int, samples: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    wav = torch.randn(batch, samples, generator=generator)
    frames, cfg = model.num_frames(samples), model.config
    negatives = sample_distractors(batch, frames, cfg.num_negatives, generator=generator)
    cross = torch.randint(0, batch * frames, (batch, cfg.cross_negatives, frames), generator=generator)
    return wav, negatives, cross if cfg.cross_negatives else None


def loss_and_gradients(step: torch.nn.Module, model: Wav2Vec, wav: torch.Tensor, *distractors,
                       amp: contextlib.AbstractContextManager | None = None) -> tuple:
    """step(wav, *distractors)'s loss and metrics, and the gradients it leaves in `model`'s parameters."""
    model.zero_grad(set_to_none=True)
    with amp or contextlib.nullcontext():
        loss, metrics = step(wav, *distractors)
    loss.backward()
    return loss.detach(), metrics, {name: p.grad.clone() for name, p in model.named_parameters()}


def in_float64(model: Wav2Vec) -> Wav2Vec:
    """A float64 copy whose GroupNorms compute in float64 too (Fp32GroupNorm would round them to fp32)."""
    model = copy.deepcopy(model).double()
    for module in model.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.forward = types.MethodType(torch.nn.GroupNorm.forward, module)
    return model


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----- the two operations ---------------------------------------------------------------------------

@pytest.mark.parametrize("c_in, c_out, k, s, frames", [(5, 7, 8, 4, 43), (6, 6, 4, 2, 20), (4, 3, 1, 1, 9),
                                                       (3, 5, 10, 5, 51)])
def test_time_major_conv_is_conv1d_with_exact_gradients(c_in, c_out, k, s, frames):
    x = torch.randn(2, frames, c_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c_out, c_in, k, dtype=torch.float64, requires_grad=True)
    want = F.conv1d(x.transpose(1, 2), w, stride=s).transpose(1, 2)
    torch.testing.assert_close(TimeMajorConv.apply(x, w, s), want)
    assert torch.autograd.gradcheck(lambda x, w: TimeMajorConv.apply(x, w, s), (x, w))


def test_time_major_group_norm_is_group_norm_with_exact_gradients():
    x = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True) + 3
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    want = F.group_norm(x.transpose(1, 2), 1, w, b, 1e-5).transpose(1, 2)
    torch.testing.assert_close(GroupNormTimeMajor.apply(x, w, b, 1e-5), want)
    assert torch.autograd.gradcheck(lambda x, w, b: GroupNormTimeMajor.apply(x, w, b, 1e-5), (x, w, b))


# ----- the whole step -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_in_float64_the_fast_step_is_the_plain_step_to_rounding(case):
    preset, overrides, batch, samples = CASES[case]
    model = in_float64(tiny_model(preset, **overrides))
    wav, *distractors = inputs(model, batch, samples)
    wav = wav.double()
    plain_loss, plain_metrics, plain = loss_and_gradients(model, model, wav, *distractors)
    fast_loss, fast_metrics, fast = loss_and_gradients(FastTraining(model), model, wav, *distractors)
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-12)
    assert fast_metrics["accuracy"] == plain_metrics["accuracy"]
    for name, grad in plain.items():
        assert max_relative(fast[name], grad) < 1e-10, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_float32_the_fast_step_gives_the_plain_loss_and_gradients_to_float_tolerance(case):
    preset, overrides, batch, samples = CASES[case]
    model = tiny_model(preset, **overrides)
    wav, *distractors = inputs(model, batch, samples)
    plain_loss, _, plain = loss_and_gradients(model, model, wav, *distractors)
    fast_loss, _, fast = loss_and_gradients(FastTraining(model), model, wav, *distractors)
    assert fast_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for name, grad in plain.items():
        assert max_relative(fast[name], grad) < 1e-4, name


def test_the_fast_encoder_gives_the_plain_z():
    model = tiny_model("wav2vec_large")
    wav = torch.randn(2, 5000)
    torch.testing.assert_close(encode_time_major(model.encoder, wav), model.encoder(wav), rtol=1e-5,
                               atol=1e-6)


def test_under_bf16_autocast_the_fast_step_is_as_close_to_fp32_as_the_plain_one():
    model = tiny_model("wav2vec_small")
    wav, *distractors = inputs(model, 2, 4000)
    amp = torch.autocast("cpu", dtype=torch.bfloat16)
    want, _, _ = loss_and_gradients(model, model, wav, *distractors)
    plain, _, _ = loss_and_gradients(model, model, wav, *distractors, amp=amp)
    fast, _, grads = loss_and_gradients(FastTraining(model), model, wav, *distractors, amp=amp)
    assert abs(fast - want) <= 2 * abs(plain - want) + 1e-3 * want
    assert all(grad.dtype == torch.float32 and grad.isfinite().all() for grad in grads.values())


# ----- where it applies -----------------------------------------------------------------------------

def test_eval_and_no_grad_calls_take_the_plain_path_bit_for_bit():
    model = tiny_model("wav2vec_small")
    wav, *distractors = inputs(model, 2, 4000)
    fast = fast_or_plain(model)
    with torch.no_grad():
        assert torch.equal(fast(wav, *distractors)[0], model(wav, *distractors)[0])
    fast.eval()
    assert not model.training
    assert torch.equal(fast(wav, *distractors)[0], model(wav, *distractors)[0])


def test_streaming_and_non_cpu_models_train_on_the_plain_path():
    streaming = Wav2Vec(Wav2VecConfig.preset("wav2vec_tiny", channels=8))
    assert fast_or_plain(streaming) is streaming
    elsewhere = Wav2Vec(Wav2VecConfig.preset("wav2vec_small", channels=8)).to("meta")
    assert fast_or_plain(elsewhere) is elsewhere


def test_the_fast_module_trains_the_models_own_parameters_under_their_own_names():
    model = tiny_model("wav2vec_small")
    fast = fast_or_plain(model)
    assert isinstance(fast, FastTraining)
    assert [id(p) for p in fast.parameters()] == [id(p) for p in model.parameters()]
    names = list(model.state_dict())
    optimizer = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    loss, _ = fast(*inputs(model, 2, 4000))
    loss.backward()
    before = model.encoder.layers[1].conv.weight.clone()
    optimizer.step()
    assert not torch.equal(model.encoder.layers[1].conv.weight, before)
    assert list(model.state_dict()) == names == list(Wav2Vec(model.config).state_dict())
