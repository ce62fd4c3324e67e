"""A faster CPU training step for the same model: the encoder computed time-major (issue #27).

model.py is the reference implementation; this module only re-arranges its encoder's arithmetic while
training. `fast_or_plain(model)` returns a FastTraining module that shares every parameter of `model` and
whose forward(wav, negatives, cross_negatives) gives model(wav, ...)'s loss and metrics, equal up to float
rounding (tests/test_fastpath.py), or `model` itself where the fast path does not apply.

Why it is faster: every encoder layer of the presets has kernel k = taps * stride (k = 2 * stride, and
k = stride = 1 for the large model's pointwise layers). With activations stored time-major, (B, T, C), a
group of `stride` consecutive frames is one contiguous row of stride * C features, so a strided conv is
ONE matmul on a view of its input (no im2col copy) followed by a shifted sum of its taps' column blocks.
oneDNN's channels-first conv instead reorders its input to a blocked layout and copies its input gradient
back from channels-last; at 128 channels on an Intel CPU those copies cost more than the arithmetic. The
first layer (one input channel) is unfold + matmul: its im2col is only twice the waveform. GroupNorm with
one group has the per-sample statistics of layer_norm over the last two dims of (B, T, C), so the norm is
the native layer_norm forward and the native group_norm backward on the same memory: no transposes.
docs/RESULTS.md has the profile and the measurements.

Only training with gradients takes it: eval, no-grad extraction, streaming and export run model.py's own
convolutions, bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Encoder, Wav2Vec


class TimeMajorConv(torch.autograd.Function):
    """Bias-free conv1d with kernel k = taps * stride on time-major x (B, L, C_in) -> (B, T, C_out): one
    batched matmul of rows of `stride` frames with a (stride * C_in, taps * C_out) matrix, output frame t
    summing column block j of row t + j. Under autocast it computes in the autocast dtype, as F.conv1d
    would, and returns the weight's gradient in the weight's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x, w = x.to(dtype), _tap_matrix(weight, stride).to(dtype)
            c_out, taps = weight.shape[0], weight.shape[2] // stride
            rows = _stride_rows(x, stride)
            y = torch.bmm(rows, w.expand(len(x), -1, -1))  # (B, R, taps * C_out); bmm takes x batch-strided
            T = rows.shape[1] - taps + 1
            out = y[:, :T, :c_out].clone()
            for j in range(1, taps):
                out += y[:, j:j + T, j * c_out:(j + 1) * c_out]
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.weight_shape, ctx.weight_dtype = stride, weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, w = ctx.saved_tensors
        stride, (c_out, c_in, k), B = ctx.stride, ctx.weight_shape, len(x)
        taps, T = k // stride, grad.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            grad_y = grad.new_zeros(B, T + taps - 1, taps * c_out, dtype=x.dtype)  # grad, shifted per tap
            for j in range(taps):
                grad_y[:, j:j + T, j * c_out:(j + 1) * c_out] = grad
            grad_x = grad_w = None
            if ctx.needs_input_grad[0]:
                grad_x = torch.empty_like(x)
                grad_x[:, grad_y.shape[1] * stride:] = 0  # the trailing frames no output sees
                torch.bmm(grad_y, w.t().expand(B, -1, -1), out=_stride_rows(grad_x, stride))
            if ctx.needs_input_grad[1]:
                grad_w = torch.bmm(_stride_rows(x, stride).transpose(1, 2), grad_y).sum(0)
                grad_w = grad_w.view(stride, c_in, taps, c_out).permute(3, 1, 2, 0).reshape(c_out, c_in, k)
                grad_w = grad_w.to(ctx.weight_dtype)
        return grad_x, grad_w, None


def _tap_matrix(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """(C_out, C_in, k) -> (stride * C_in, taps * C_out): entry [r * C_in + c, j * C_out + o] is
    weight[o, c, j * stride + r]."""
    c_out, c_in, k = weight.shape
    return weight.reshape(c_out, c_in, k // stride, stride).permute(3, 1, 2, 0).reshape(stride * c_in, -1)


def _stride_rows(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Time-major (B, L, C) -> (B, L // stride, stride * C), a view; the last L % stride frames are left
    out."""
    B, L, C = x.shape
    return x[:, :L // stride * stride].view(B, L // stride, stride * C)


class GroupNormTimeMajor(torch.autograd.Function):
    """GroupNorm with one group on time-major x (B, T, C): the forward is the native layer_norm over (T, C)
    (precise statistics) with the per-channel affine broadcast over T; the backward is the native group_norm
    backward on the channels-last view (B, C, 1, T) of the same memory, fed those statistics. (The native
    group_norm forward on that view is ~50x less accurate on CPU; layer_norm's own backward reduces (T, C)
    weight gradients and is slower.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        B, T, C = x.shape
        y, mean, rstd = torch.native_layer_norm(x, (T, C), weight.expand(T, C), bias.expand(T, C), eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        B, T, C = x.shape
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            _channels_last(grad.contiguous()), _channels_last(x), mean.view(B, 1), rstd.view(B, 1), weight,
            B, C, T, 1, list(ctx.needs_input_grad[:3]))
        return (grad_x.squeeze(2).transpose(1, 2) if grad_x is not None else None), grad_w, grad_b, None


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Time-major (B, T, C) -> the (B, C, 1, T) view of the same memory."""
    return x.transpose(1, 2).unsqueeze(2)


def _norm_relu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """ReLU(Fp32GroupNorm(x)) for time-major x (B, T, C): the norm in fp32 under autocast (float64 stays
    float64); ReLU in place, since the norm's backward needs its input, not its output."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        y = GroupNormTimeMajor.apply(x.to(dtype), norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
    return F.relu_(y.type_as(x))


def encode_time_major(encoder: Encoder, wav: torch.Tensor) -> torch.Tensor:
    """encoder(wav) computed on (B, T, C) activations: z (B, C, T), a transposed view of them."""
    first, *rest = encoder.layers
    (k,), (s,) = first.conv.kernel_size, first.conv.stride
    x = _norm_relu(first.norm, wav.unfold(1, k, s) @ first.conv.weight.reshape(-1, k).t())
    for layer in rest:
        x = _norm_relu(layer.norm, TimeMajorConv.apply(x, layer.conv.weight, layer.conv.stride[0]))
    z = x.transpose(1, 2)
    return torch.log1p(z.abs()) if encoder.log_compression else z


class FastTraining(nn.Module):
    """`model` with the time-major encoder while it trains with gradients, and model.py's own path
    otherwise. It holds no parameters of its own: checkpoints keep saving `model`'s state dict."""

    def __init__(self, model: Wav2Vec):
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor, negatives: torch.Tensor | None = None,
                cross_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Wav2Vec.forward's (loss in nats, metrics)."""
        model = self.model
        if not (model.training and torch.is_grad_enabled()):
            return model(wav, negatives, cross_negatives)
        z = encode_time_major(model.encoder, wav)
        return model.objective(z, model.context(z), negatives, cross_negatives)


def fast_path_applies(model: Wav2Vec) -> bool:
    """A CPU model with GroupNorm (one group) in its encoder, each kernel a multiple of its stride (every
    preset): where the time-major step was measured faster."""
    cfg = model.config
    on_cpu = next(model.parameters()).device.type == "cpu"
    return on_cpu and cfg.norm == "group" and all(k % s == 0 for _, k, s in cfg.encoder_layers)


def fast_or_plain(model: Wav2Vec) -> nn.Module:
    """What a training loop should call for `model`: FastTraining(model) where the fast path applies, else
    `model` itself."""
    return FastTraining(model) if fast_path_applies(model) else model
