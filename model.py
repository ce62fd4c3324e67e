"""wav2vec 1.0 (Schneider et al. 2019): encoder, causal context network and contrastive objective.

Shapes are channels-first: waveform wav (B, L) at 16 kHz, features z and c (B, C, T), one frame per
10 ms. See docs/DESIGN.md for where the paper and fairseq differ and what we chose.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    import numpy as np

LayerSpec = tuple[int, int, int]  # (channels, kernel, stride)


class UserError(Exception):
    """An error the user caused and can fix; command-line tools print its message without a trace."""


ENCODER_BASE: tuple[LayerSpec, ...] = ((512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2))


@dataclass(frozen=True)
class Wav2VecConfig:
    """Every architectural and objective choice; checkpoints store it as a plain dict."""

    encoder_layers: tuple[LayerSpec, ...] = ENCODER_BASE
    context_layers: tuple[LayerSpec, ...] = ((512, 3, 1),) * 9
    norm: str = "group"  # "group": over channels and time (paper); "layer": per frame, strictly causal
    causal_padding: str = "replicate"  # "replicate" the first frame (fairseq) or "zero"
    skip_connections: bool = False  # residual around every context layer (on in both presets)
    residual_scale: float = 0.5  # the residual sum is scaled by sqrt(residual_scale), as in fairseq
    log_compression: bool = False  # z = log(1 + |z|) after the encoder (wav2vec large)
    prediction_steps: int = 12  # K
    offset: int | str = "auto"  # first predicted frame is t + offset; "auto" = ceil(receptive field / stride)
    num_negatives: int = 10  # distractors from the same utterance, per target frame
    cross_negatives: int = 0  # extra distractors from anywhere in the batch
    loss_type: str = "contrastive"  # "contrastive" (binary, paper eq. 1) or "infonce"

    def __post_init__(self) -> None:
        choices = {"norm": ("group", "layer"), "causal_padding": ("replicate", "zero"),
                   "loss_type": ("contrastive", "infonce")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}.")
        if self.offset != "auto" and not (isinstance(self.offset, int) and self.offset >= 0):
            raise UserError(f"offset must be 'auto' or a non-negative integer, not {self.offset!r}.")
        if self.prediction_steps < 1 or self.num_negatives + self.cross_negatives < 1:
            raise UserError("prediction_steps and the number of negatives must be at least 1.")

    @classmethod
    def preset(cls, name: str, channels: int | None = None, **overrides) -> Wav2VecConfig:
        """The paper's base model ("wav2vec"), its layout at 128 channels ("wav2vec_small"), the released
        large model ("wav2vec_large") or the streamable keyword-spotting size ("wav2vec_tiny"); `channels`
        sets every width (default: the preset's own)."""
        if name not in PRESETS:
            raise UserError(f"Unknown model {name!r}: choose one of {sorted(PRESETS)}.")
        config = PRESETS[name]
        if channels is not None:
            config = replace(config, encoder_layers=_with_width(config.encoder_layers, channels),
                             context_layers=_with_width(config.context_layers, channels))
        return replace(config, **overrides)

    def to_dict(self) -> dict:
        """A plain dict of builtins (lists, ints, strs), safe for torch.load(weights_only=True)."""
        d = asdict(self)
        d["encoder_layers"] = [list(layer) for layer in self.encoder_layers]
        d["context_layers"] = [list(layer) for layer in self.context_layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Wav2VecConfig:
        """Inverse of to_dict; unknown keys are an error so that a foreign dict is not half-read."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"Unknown model config keys {sorted(unknown)}: "
                            "was this checkpoint saved by another version?")
        d = dict(d)
        for key in ("encoder_layers", "context_layers"):
            if key in d:
                d[key] = tuple(tuple(int(v) for v in layer) for layer in d[key])
        return cls(**d)

    @property
    def stride(self) -> int:
        """Samples per frame (160 = 10 ms at 16 kHz for the presets)."""
        return math.prod(s for _, _, s in self.encoder_layers)

    @property
    def receptive_field(self) -> int:
        """Samples seen by one encoder frame (465 for the presets)."""
        field, jump = 1, 1
        for _, k, s in self.encoder_layers:
            field += (k - 1) * jump
            jump *= s
        return field

    def samples_for(self, frames: int) -> int:
        """The shortest input in samples from which the encoder makes `frames` frames."""
        return self.receptive_field + (frames - 1) * self.stride

    @property
    def resolved_offset(self) -> int:
        # "auto" (fairseq): the first target z(t + offset) shares no input samples with z(t), the last
        # frame c(t) has seen: ceil(465 / 160) = 3 for the presets.
        if self.offset == "auto":
            return math.ceil(self.receptive_field / self.stride)
        return int(self.offset)


def _with_width(layers: tuple[LayerSpec, ...], channels: int) -> tuple[LayerSpec, ...]:
    return tuple((channels, k, s) for _, k, s in layers)


PRESETS = {
    # The paper's base: 5 encoder layers, 9 causal context layers of kernel 3 (15,491,072 parameters),
    # with the released model's parameter-free skip connections. Without them the binary loss collapses
    # within ~20 updates to its trivial point (every score -ln 10, c constant over time) and stayed there
    # in every run we tried; with them it leaves it after 50-300 updates (speechocean762, demo corpus).
    "wav2vec": Wav2VecConfig(skip_connections=True),
    # The base layout at 128 channels (972,800 parameters): main.py's default. On a 2-core CPU it makes ~10x
    # the updates of the 512-channel base per hour, and per CPU-minute its features were the best we measured
    # (README: "Choosing the default recipe").
    "wav2vec_small": Wav2VecConfig(
        encoder_layers=_with_width(ENCODER_BASE, 128),
        context_layers=((128, 3, 1),) * 9,
        skip_connections=True,
    ),
    # The released wav2vec_large.pt: two extra pointwise encoder layers, 12 context layers of kernel
    # 2..13 with skip connections, log compression (32,537,088 parameters).
    "wav2vec_large": Wav2VecConfig(
        encoder_layers=ENCODER_BASE + ((512, 1, 1),) * 2,
        context_layers=tuple((512, k, 1) for k in range(2, 14)),
        skip_connections=True,
        log_compression=True,
    ),
    # Keyword spotting on microcontroller-class devices: the base layout at 64 channels with per-frame
    # LayerNorm, so that it streams (Wav2Vec.streamer). 244,736 parameters, 195,520 without the
    # prediction head that only pre-training uses; 50.4 M multiply-adds per second of audio.
    "wav2vec_tiny": Wav2VecConfig(
        encoder_layers=_with_width(ENCODER_BASE, 64),
        context_layers=((64, 3, 1),) * 9,
        norm="layer",
        skip_connections=True,
    ),
}


class Fp32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in fp32 under autocast: statistics over a whole crop overflow in fp16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                                self.eps).type_as(x)


class FrameLayerNorm(nn.LayerNorm):
    """LayerNorm over channels of each frame separately, so no statistic looks at the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T)
        with torch.autocast(x.device.type, enabled=False):
            if x.shape[-1] == 1:  # one frame (a one-hop streaming step): no transposes in the exported graph
                return F.layer_norm(x.float(), (*self.normalized_shape, 1), self.weight.float()[:, None],
                                    self.bias.float()[:, None], self.eps).type_as(x)
            y = F.layer_norm(x.float().transpose(1, 2), self.normalized_shape, self.weight.float(),
                             self.bias.float(), self.eps)
        return y.transpose(1, 2).type_as(x)


def make_norm(kind: str, channels: int) -> nn.Module:
    return Fp32GroupNorm(1, channels) if kind == "group" else FrameLayerNorm(channels)


class ConvBlock(nn.Module):
    """Conv1d, normalization, ReLU; optional left-only padding makes it causal."""

    def __init__(self, c_in: int, spec: LayerSpec, norm: str, causal_padding: str | None, bias: bool):
        super().__init__()
        c_out, k, s = spec
        self.left_pad, self.padding_mode = (k - 1, causal_padding) if causal_padding else (0, None)
        self.conv = nn.Conv1d(c_in, c_out, k, stride=s, bias=bias)
        self.norm = make_norm(norm, c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left_pad:
            mode = "replicate" if self.padding_mode == "replicate" else "constant"
            x = F.pad(x, (self.left_pad, 0), mode=mode)
        return self.unpadded(x)

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, norm, ReLU on input that already holds its left context (as streaming feeds it)."""
        return F.relu(self.norm(self.conv(x)))

    def padding_frame(self, first: torch.Tensor) -> torch.Tensor:
        """The frame (B, C, 1) forward() pads with k-1 times, from the first input frame: itself, or zeros."""
        return first if self.padding_mode == "replicate" else torch.zeros_like(first)


class Encoder(nn.Module):
    """f: waveform (B, L) -> latent z (B, C, T); valid convolutions, total stride 160."""

    def __init__(self, config: Wav2VecConfig):
        super().__init__()
        channels = [1] + [c for c, _, _ in config.encoder_layers]
        self.layers = nn.ModuleList(
            ConvBlock(c_in, spec, config.norm, causal_padding=None, bias=False)
            for c_in, spec in zip(channels, config.encoder_layers, strict=False)
        )
        self.log_compression = config.log_compression

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)
        for layer in self.layers:
            x = layer(x)
        return torch.log1p(x.abs()) if self.log_compression else x

    def stream(self, wav: torch.Tensor,
               buffers: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """New samples wav (B, L) -> the frames z (B, C, t) they complete (t may be 0), and the new buffers.
        buffers[i] holds layer i's input not yet consumed by a full stride (always fewer than k frames)."""
        x, kept = wav.unsqueeze(1), []
        for layer, buffer in zip(self.layers, buffers, strict=True):
            x = torch.cat([buffer, x], dim=2)
            (k,), (s,) = layer.conv.kernel_size, layer.conv.stride
            n = (x.shape[-1] - k) // s + 1 if x.shape[-1] >= k else 0  # outputs this input completes
            kept.append(x[..., n * s:])
            width = layer.conv.out_channels
            x = layer.unpadded(x[..., :(n - 1) * s + k]) if n else x.new_zeros(len(x), width, 0)
        return (torch.log1p(x.abs()) if self.log_compression else x), kept


class ContextNetwork(nn.Module):
    """g: z (B, C, T) -> c (B, C, T); causal convolutions, optional scaled skip connections."""

    def __init__(self, config: Wav2VecConfig):
        super().__init__()
        channels = [config.encoder_layers[-1][0]] + [c for c, _, _ in config.context_layers]
        self.layers = nn.ModuleList(
            ConvBlock(c_in, spec, config.norm, config.causal_padding, bias=True)
            for c_in, spec in zip(channels, config.context_layers, strict=False)
        )
        # A 1x1 projection carries the residual only where a layer changes the width.
        self.residual_proj = nn.ModuleList(
            nn.Conv1d(c_in, c_out, 1, bias=False) if config.skip_connections and c_in != c_out
            else nn.Identity()
            for c_in, (c_out, _, _) in zip(channels, config.context_layers, strict=False)
        )
        self.skip_connections = config.skip_connections
        self.residual_scale = math.sqrt(config.residual_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer_outputs(z)[-1]

    def layer_outputs(self, z: torch.Tensor) -> list[torch.Tensor]:
        """z (B, C, T) -> the output (B, C, T) of every context layer, the last being c (for a downstream
        head's learned weighted sum of layers, as in SUPERB)."""
        x, outputs = z, []
        for layer, proj in zip(self.layers, self.residual_proj, strict=True):
            y = layer(x)
            x = (y + proj(x)) * self.residual_scale if self.skip_connections else y
            outputs.append(x)
        return outputs

    def stream(self, z: torch.Tensor, buffers: list[torch.Tensor],
               position: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """New frames z (B, C, t >= 1) -> their c (B, C, t), and each layer's last k-1 input frames.
        `position` (0-dim int64) is the stream index of z's first frame. Every frame with a negative index
        (the buffers before the stream starts, or the warm-up frames of a fixed-shape step, not audio yet)
        is replaced by forward()'s padding, made from frame 0, in the call that holds frame 0 (later calls
        find the padding in the buffers); outputs at negative indices mean nothing. A tensor, not a Python
        int, so that an exported graph carries it as state."""
        x, kept = z, []
        frame_0 = (-position).clamp(0, z.shape[-1] - 1).reshape(1)  # frame 0's place in z, if there
        for layer, proj, buffer in zip(self.layers, self.residual_proj, buffers, strict=True):
            window = torch.cat([buffer, x], dim=2)
            index = position - layer.left_pad + torch.arange(window.shape[-1], device=window.device)
            before_audio = (index < 0) & (position <= 0)
            window = torch.where(before_audio, layer.padding_frame(x.index_select(2, frame_0)), window)
            kept.append(window[..., window.shape[-1] - layer.left_pad:])
            y = layer.unpadded(window)
            x = (y + proj(x)) * self.residual_scale if self.skip_connections else y
        return x, kept


class StepPredictions(nn.Module):
    """h_k(c) = W_k c + b for k = 1..K in one matmul; one bias shared by all steps, as in fairseq."""

    def __init__(self, context_dim: int, latent_dim: int, steps: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(steps, latent_dim, context_dim))
        self.bias = nn.Parameter(torch.zeros(latent_dim))

    def reset_parameters(self) -> None:
        """W_k uniform in +-sqrt(6 / (C_z C + K C_z)), zero bias: small, so first scores are nearly equal."""
        # This is xavier_uniform_ over the whole (K, C_z, C) tensor (fan_in C_z C, fan_out K C_z): 16x below
        # Xavier for one C_z x C matrix at 512 channels (0.0047 against 0.0765). Per-matrix Xavier was
        # measured and is worse: its large first scores sent InfoNCE to its collapsed value for ~30 updates
        # on speechocean762 and ended the demo at validation accuracy 0.245 instead of 0.325 (README).
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c: (B, C, T) -> predictions (B, T, K, C_z)."""
        steps, c_out, c_in = self.weight.shape
        out = c.transpose(1, 2) @ self.weight.reshape(steps * c_out, c_in).t()
        return out.unflatten(-1, (steps, c_out)) + self.bias


def sample_distractors(batch: int, frames: int, n: int, device: torch.device | str = "cpu",
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n, T) frame indices, uniform over the other frames of the same utterance (never the positive)."""
    if frames < 2:
        raise UserError("An utterance needs at least 2 frames to draw distractors from; use longer crops.")
    draws = torch.randint(0, frames - 1, (batch, n, frames), device=device, generator=generator)
    positive = torch.arange(frames, device=device)
    return draws + (draws >= positive).long()  # skip over the positive: uniform over the other T-1


def sample_cross_distractors(batch: int, frames: int, n: int, device: torch.device | str = "cpu",
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, n, T) indices into the batch's B*T frames (b * T + t), never the positive itself."""
    total = batch * frames
    if total < 2:
        raise UserError("Cross-utterance distractors need at least 2 frames in the batch.")
    draws = torch.randint(0, total - 1, (batch, n, frames), device=device, generator=generator)
    positive = torch.arange(total, device=device).view(batch, 1, frames)
    return draws + (draws >= positive).long()


class Wav2Vec(nn.Module):
    """Encoder, context network and step-specific predictions, trained with a contrastive loss."""

    def __init__(self, config: Wav2VecConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.context = ContextNetwork(config)
        self.predictions = StepPredictions(config.context_layers[-1][0], config.encoder_layers[-1][0],
                                           config.prediction_steps)
        self.apply(_init_weights)
        self.predictions.reset_parameters()  # after the convolutions, so their random draws stay the same

    @property
    def receptive_field(self) -> int:
        return self.config.receptive_field

    def num_frames(self, length: int) -> int:
        """Frames the encoder outputs for `length` samples (0 if too short for one frame)."""
        for _, k, s in self.config.encoder_layers:
            if length < k:
                return 0
            length = (length - k) // s + 1
        return length

    def draw_distractors(self, batch_size: int, length: int, micro_batches: int,
                         generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(negatives (B, N, T), cross negatives (B, N', T) or None) for each of `micro_batches` batches of
        `batch_size` crops of `length` samples, from `generator` alone. In-utterance ones are drawn for all
        micro-batches at once: k accumulated batches of B get the distractors one batch of kB would."""
        cfg, frames, device = self.config, self.num_frames(length), generator.device
        negatives = sample_distractors(micro_batches * batch_size, frames, cfg.num_negatives, device,
                                       generator)
        return [(n, sample_cross_distractors(batch_size, frames, cfg.cross_negatives, device, generator)
                 if cfg.cross_negatives else None) for n in negatives.split(batch_size)]

    @property
    def collapsed_loss(self) -> float:
        """The loss (nats) when every score is equal, at its best constant: where a collapsed model sits."""
        n = self.config.num_negatives + self.config.cross_negatives
        if self.config.loss_type == "infonce":
            return math.log(n + 1)
        return math.log(n + 1) + n * math.log1p(1 / n)  # the constant score is sigmoid^-1(1 / (n + 1))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_flops(self, length: int, objective: bool = True) -> dict[str, int]:
        """Analytic matmul/conv FLOPs (2 per multiply-add) of one forward pass on `length` samples,
        by part; `objective=False` counts feature extraction only. A training step costs about 3x."""
        cfg = self.config
        frames, c_in, encoder = length, 1, 0
        for c_out, k, s in cfg.encoder_layers:
            frames = (frames - k) // s + 1
            encoder += 2 * c_in * c_out * k * frames
            c_in = c_out
        context = 0
        for c_out, k, _ in cfg.context_layers:
            context += 2 * c_in * c_out * k * frames
            if cfg.skip_connections and c_in != c_out:
                context += 2 * c_in * c_out * frames
            c_in = c_out
        flops = {"encoder": encoder, "context": context}
        if objective:
            c_z, steps = cfg.encoder_layers[-1][0], cfg.prediction_steps
            candidates = 1 + cfg.num_negatives + cfg.cross_negatives
            flops["prediction"] = 2 * c_in * c_z * steps * frames
            used_steps = max(0, min(steps, frames - cfg.resolved_offset))
            flops["scores"] = 2 * frames * used_steps * c_z * candidates
        return flops

    def forward(self, wav: torch.Tensor, negatives: torch.Tensor | None = None,
                cross_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """wav (B, L) -> (loss in nats, metrics). `negatives` (B, N, T) pins the in-utterance distractor
        frames; `cross_negatives` (B, N', T) the cross-utterance ones (indices b * T + t)."""
        z = self.encoder(wav)
        c = self.context(z)
        return self.objective(z, c, negatives, cross_negatives)

    @torch.no_grad()
    def extract_features(self, wav: torch.Tensor | np.ndarray, sample_rate: int = 16000
                         ) -> dict[str, torch.Tensor]:
        """wav (B, L) or (L,) at 16 kHz, a tensor or a numpy array -> {"z": (B, C, T), "c": (B, C, T)}; no
        gradients, no loss work. A file or another rate goes through features.load_waveform first."""
        if isinstance(wav, (str, Path)) or sample_rate != 16000:
            given = f"the path {wav}" if isinstance(wav, (str, Path)) else f"audio at {sample_rate} Hz"
            raise UserError(f"extract_features takes a 16 kHz waveform, not {given}: load it with "
                            "features.load_waveform(path_or_array, sample_rate), which resamples.")
        wav = torch.as_tensor(wav)
        if wav.dim() == 1:
            wav = wav.unsqueeze(0)
        if wav.dim() != 2:
            raise UserError(f"Expected a waveform of shape (B, L) or (L,), got {tuple(wav.shape)}.")
        if self.num_frames(wav.shape[-1]) < 1:
            raise UserError(f"Audio of {wav.shape[-1]} samples is shorter than one frame "
                            f"({self.receptive_field} samples at 16 kHz).")
        param = next(self.parameters())
        z = self.encoder(wav.to(device=param.device, dtype=param.dtype))
        return {"z": z, "c": self.context(z)}

    def objective(self, z: torch.Tensor, c: torch.Tensor, negatives: torch.Tensor | None = None,
                  cross_negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Score c(t) against z(t + offset + k) and its distractors for every step k, without loops."""
        B, _, T = z.shape
        cfg = self.config
        offset = cfg.resolved_offset
        if T <= offset:
            raise UserError(f"A crop of {T} frames leaves nothing to predict at offset {offset}; "
                            "use longer segments.")
        candidates = self._candidate_frames(B, T, z.device, negatives, cross_negatives)  # (B, T, J)
        predictions = self.predictions(c)  # (B, T, K, C)
        steps = min(cfg.prediction_steps, T - offset)
        # Row u holds the predictions made for target frame u: step k comes from context frame u - offset - k.
        source = torch.arange(T, device=z.device).view(T, 1) - offset - torch.arange(steps, device=z.device)
        valid = source >= 0  # (T, K)
        # index_select, not advanced indexing: its backward is a scatter-add, not a sort (issue #27)
        rows = (source.clamp(min=0) * predictions.shape[2] + torch.arange(steps, device=z.device)).flatten()
        predictions = predictions.flatten(1, 2).index_select(1, rows).unflatten(1, (T, steps))
        with torch.autocast(z.device.type, enabled=False):
            frames = _at_least_fp32(z).transpose(1, 2).reshape(B * T, -1)
            targets = frames.index_select(0, candidates.flatten()).view(*candidates.shape, -1)  # (B, T, J, C)
            scores = _at_least_fp32(predictions) @ targets.transpose(-1, -2)  # (B, T, K, J)
            return self._loss_and_metrics(scores, valid)

    def _candidate_frames(self, B: int, T: int, device: torch.device, negatives: torch.Tensor | None,
                          cross_negatives: torch.Tensor | None) -> torch.Tensor:
        """(B, T, 1 + N + N') indices into the flattened (B*T) frames: the positive, then distractors."""
        cfg = self.config
        if negatives is None:
            negatives = sample_distractors(B, T, cfg.num_negatives, device)
        if cross_negatives is None and cfg.cross_negatives:
            cross_negatives = sample_cross_distractors(B, T, cfg.cross_negatives, device)
        utterance_start = (torch.arange(B, device=device) * T).view(B, 1, 1)
        parts = [torch.arange(B * T, device=device).view(B, 1, T), negatives.to(device) + utterance_start]
        if cross_negatives is not None:
            parts.append(cross_negatives.to(device))
        return torch.cat(parts, dim=1).transpose(1, 2)

    def _loss_and_metrics(self, scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """scores (B, T, K, J) with the positive at j = 0; valid (T, K) marks positions with a context.
        Fixed shapes throughout (no boolean indexing), so the step never waits for the device."""
        if self.config.loss_type == "contrastive":
            # -log sigmoid(s_pos) - sum_n log sigmoid(-s_neg), summed, divided by the number of positives.
            per_position = F.softplus(-scores[..., 0]) + F.softplus(scores[..., 1:]).sum(-1)
        else:  # cross-entropy with the positive as the class
            per_position = torch.logsumexp(scores, -1) - scores[..., 0]
        weight = valid.to(scores.dtype)  # (T, K), the same for every utterance
        positions_per_step = scores.shape[0] * weight.sum(0)  # (K,)
        loss = torch.where(valid, per_position, 0.0).sum() / positions_per_step.sum()
        # Correct only when the positive is strictly highest, by more than float rounding: a collapsed
        # model (all scores equal up to the matmul's summation order) must score 0, not 1.
        margin = scores[..., 0] - scores[..., 1:].amax(-1)
        correct = (margin > 1e-5 * scores.abs().amax(-1)).to(scores.dtype) * weight  # (B, T, K)
        metrics = {"loss_bits": loss.detach() / math.log(2),
                   "accuracy": correct.sum() / positions_per_step.sum(),
                   "accuracy_per_step": correct.sum((0, 1)) / positions_per_step.clamp(min=1)}
        return loss, metrics

    def streamer(self) -> Streamer:
        """A stateful extractor: `s.push(chunk)` takes audio as it comes, returns the frames it completes."""
        return Streamer(self)

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Wav2Vec:
        """A model in eval mode from a checkpoint of this repository or of fairseq's wav2vec 1.0."""
        # Read on the CPU, then the model moves: a training checkpoint's optimizer state stays off the GPU.
        config, state_dict = load_checkpoint_weights(path)
        model = cls(config)
        model.load_state_dict(state_dict)
        return model.to(map_location).eval()


# ----- streaming ----------------------------------------------------------------------------------

def check_streamable(config: Wav2VecConfig) -> None:
    """Refuse a model whose frames depend on audio that has not arrived yet."""
    if config.norm != "layer":
        raise UserError(f"This model uses norm={config.norm!r}, whose statistics span the whole input, so "
                        "no frame is final until the input ends and it cannot stream: pre-train one with "
                        "per-frame LayerNorm instead (python main.py --model wav2vec_tiny, or norm='layer').")


def _context_buffers(model: Wav2Vec, like: torch.Tensor) -> list[torch.Tensor]:
    """Zeros standing in for each context layer's last k-1 input frames until the first frame arrives."""
    return [like.new_zeros(1, layer.conv.in_channels, layer.left_pad) for layer in model.context.layers]


class Streamer:
    """Frame-by-frame extraction from a norm="layer" model, equal to extract_features on the whole input.

    push(chunk) takes the next samples (L,), any number of them, and returns the frames they complete,
    {"z": (1, C, t), "c": (1, C, t)} with t >= 0. Only the left context each convolution needs is kept.
    Latency: z(t) and c(t) are returned by the push that brings sample 160 t + 464, the last of frame t's
    465-sample receptive field, i.e. 0 samples after the frame's end (c is causal: it waits for no later z).
    """

    def __init__(self, model: Wav2Vec):
        check_streamable(model.config)
        self.model = model
        like = next(model.parameters())
        self.encoder_buffers = [like.new_zeros(1, layer.conv.in_channels, 0)
                                for layer in model.encoder.layers]
        self.context_buffers = _context_buffers(model, like)
        self.frames = 0  # z frames out so far: the stream index of the next one

    @torch.no_grad()
    def push(self, chunk: torch.Tensor) -> dict[str, torch.Tensor]:
        """chunk (L,) of 16 kHz audio -> {"z": (1, C, t), "c": (1, C, t)}, the frames it completes."""
        if chunk.dim() != 1:
            raise UserError(f"push() takes a 1-D chunk of samples, got shape {tuple(chunk.shape)}.")
        like = self.context_buffers[0] if self.context_buffers else next(self.model.parameters())
        z, self.encoder_buffers = self.model.encoder.stream(chunk.to(like)[None], self.encoder_buffers)
        if z.shape[-1] == 0:
            return {"z": z, "c": z.new_zeros(1, self.model.config.context_layers[-1][0], 0)}
        position = torch.tensor(self.frames, device=z.device)  # on z's device: index_select needs it there
        c, self.context_buffers = self.model.context.stream(z, self.context_buffers, position)
        self.frames += z.shape[-1]
        return {"z": z, "c": c}


class StreamingStep(nn.Module):
    """`hops` hops of `stride` samples per call, the state as explicit inputs and outputs: the exported form.

    forward(chunk (1, hops * stride), *state) -> (z (1, C, hops), c (1, C, hops), *new state). Every shape is
    fixed: the encoder buffers have the lengths they settle at in a stream of whole hops (the same for any
    `hops`), and start as zeros, so the first `warmup_hops` frames out are not frames of the audio (drop
    them); from then on the j-th frame out is frame j - warmup_hops of extract_features, exactly. A hop
    counter in the state tells the context network where frame 0 is, where it pads. Latency at one hop
    per call: frame t is out with sample 160 (t + warmup_hops + 1) - 1, i.e. stride * (warmup_hops + 1) -
    receptive_field samples (15 for the presets) after the end of its receptive field; `hops` per call
    adds up to hops - 1 hops of waiting for the rest of the chunk.
    """

    def __init__(self, model: Wav2Vec, hops: int = 1):
        super().__init__()
        check_streamable(model.config)
        self.model, self.hops = model, hops
        cfg = model.config
        settled = math.ceil(cfg.receptive_field / cfg.stride) + 1  # enough whole hops for every layer to emit
        self.warmup_hops = settled - model.num_frames(settled * cfg.stride)
        count, self.buffer_lengths = settled * cfg.stride, []
        for _, k, s in cfg.encoder_layers:
            n = (count - k) // s + 1
            self.buffer_lengths.append(count - n * s)
            count = n

    def initial_state(self) -> list[torch.Tensor]:
        """Encoder buffers, context buffers, then the hop counter (int64): the state before any audio."""
        like = next(self.model.parameters())
        encoder = [like.new_zeros(1, layer.conv.in_channels, n)
                   for layer, n in zip(self.model.encoder.layers, self.buffer_lengths, strict=True)]
        return [*encoder, *_context_buffers(self.model, like), like.new_zeros((), dtype=torch.int64)]

    def forward(self, chunk: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_encoder = len(self.buffer_lengths)
        encoder_buffers, context_buffers = list(state[:n_encoder]), list(state[n_encoder:-1])
        hops = state[-1]
        z, encoder_buffers = self.model.encoder.stream(chunk, encoder_buffers)
        c, context_buffers = self.model.context.stream(z, context_buffers, hops - self.warmup_hops)
        return (z, c, *encoder_buffers, *context_buffers, hops + self.hops)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _init_weights(module: nn.Module) -> None:
    # Xavier (Glorot) uniform for every convolution, zero biases: the seed README's choice. The norm
    # after each conv makes the outcome insensitive to the gain.
    if isinstance(module, nn.Conv1d):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def read_checkpoint(path: str | Path,
                    remedy: str = "use one written by main.py or fairseq's wav2vec 1.0.") -> dict:
    """The dict in a checkpoint file (ours or fairseq's), loaded onto the CPU without executing pickled code.
    `remedy` ends the error for a file that is there but cannot be used: what the caller's user should do."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No checkpoint at {path}: check the path, or train one with `python main.py`.")
    try:
        # argparse.Namespace is how 2019 fairseq checkpoints store their arguments.
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling refuses foreign classes; report, never execute them
        raise UserError(f"{path} is corrupt or not a wav2vec checkpoint this repository can load safely "
                        f"({load_failure_reason(err)}): {remedy}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} does not hold a checkpoint dict: {remedy}")
    return ckpt


def load_failure_reason(err: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to retry with weights_only=False."""
    foreign = re.search(r"GLOBAL ([\w.]+)", str(err))
    if foreign:
        return f"it pickles Python code or objects ({foreign.group(1)}), which are never unpickled here"
    refused = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
    if refused and not refused.group(1).startswith("Unsupported operand"):  # that one: not a pickle at all
        return f"the safe unpickler refused it: {refused.group(1).strip()}"
    return "not a PyTorch file, or a truncated one"


def load_checkpoint_weights(path: str | Path) -> tuple[Wav2VecConfig, dict]:
    """(config, state dict), on the CPU, from a checkpoint of this repository or of fairseq's wav2vec 1.0."""
    return checkpoint_weights(read_checkpoint(path), path)


def checkpoint_weights(ckpt: dict, path: str | Path) -> tuple[Wav2VecConfig, dict]:
    """(config, state dict) from the dict read_checkpoint(path) returned."""
    if "config" in ckpt and "model" in ckpt and isinstance(ckpt["config"], dict):
        return Wav2VecConfig.from_dict(ckpt["config"]), ckpt["model"]
    if "model" in ckpt and ("args" in ckpt or "cfg" in ckpt):
        return convert_fairseq_checkpoint(ckpt)
    raise UserError(f"{path} is neither a checkpoint of this repository nor a fairseq wav2vec checkpoint.")


# ----- fairseq wav2vec 1.0 checkpoints -----------------------------------------------------------

def fairseq_config(args: dict) -> Wav2VecConfig:
    """Translate fairseq's wav2vec arguments into a Wav2VecConfig, refusing what we cannot represent."""
    arch = args.get("arch", args.get("_name", "wav2vec"))
    if args.get("vq_type", "none") not in (None, "none") or "vq" in str(arch):
        raise UserError("This is a vq-wav2vec checkpoint (vq_type is set); only wav2vec 1.0 is supported.")
    if args.get("aggregator", "cnn") != "cnn":
        raise UserError(f"aggregator={args['aggregator']!r} (a GRU context network) is not supported; "
                        "only the convolutional one ('cnn') is.")
    if args.get("skip_connections_feat", False):
        raise UserError("skip_connections_feat=True (encoder skip connections) is not supported.")
    if args.get("project_features", "none") not in (None, "none"):
        raise UserError(f"project_features={args['project_features']!r} is not supported; only 'none'.")
    if args.get("non_affine_group_norm", False):
        raise UserError("non_affine_group_norm=True is not supported; only affine GroupNorm is.")
    if args.get("feature_aggregator_type", "cnn") != "cnn":
        raise UserError("Only the convolutional feature aggregator is supported.")
    offset = args.get("offset", "auto")
    return Wav2VecConfig(
        encoder_layers=tuple(ast.literal_eval(args["conv_feature_layers"])),
        context_layers=tuple(ast.literal_eval(args["conv_aggregator_layers"])),
        causal_padding="zero" if args.get("agg_zero_pad", False) else "replicate",
        skip_connections=bool(args.get("skip_connections_agg", False)),
        residual_scale=float(args.get("residual_scale", 0.5)),
        log_compression=bool(args.get("log_compression", False)),
        prediction_steps=int(args.get("prediction_steps", 12)),
        offset=offset if offset == "auto" else int(offset),
        num_negatives=int(args.get("num_negatives", 10)),
        cross_negatives=int(args.get("cross_sample_negatives", 0)),
        loss_type="infonce" if args.get("infonce", False) else "contrastive",
    )


def fairseq_state_dict(fairseq: dict) -> dict:
    """Rename fairseq's wav2vec state dict to this repository's names and layouts."""
    ours = {}
    for name, tensor in fairseq.items():
        parts = name.split(".")
        if name.startswith("feature_extractor.conv_layers."):
            i, j, leaf = parts[2], parts[3], parts[4]
            ours[f"encoder.layers.{i}.{ {'0': 'conv', '2': 'norm'}[j] }.{leaf}"] = tensor
        elif name.startswith("feature_aggregator.conv_layers."):
            i, j, leaf = parts[2], parts[3], parts[4]
            ours[f"context.layers.{i}.{ {'1': 'conv', '3': 'norm'}[j] }.{leaf}"] = tensor
        elif name.startswith("feature_aggregator.residual_proj."):
            ours[f"context.residual_proj.{parts[2]}.{parts[3]}"] = tensor
        elif name == "wav2vec_predictions.project_to_steps.weight":
            # ConvTranspose2d weight [C_in, C_out, 1, K] -> one (C_out, C_in) matrix per step.
            ours["predictions.weight"] = tensor.squeeze(2).permute(2, 1, 0).contiguous()
        elif name == "wav2vec_predictions.project_to_steps.bias":
            ours["predictions.bias"] = tensor
        else:
            raise UserError(f"Unexpected parameter {name!r} in the fairseq checkpoint; "
                            "only wav2vec 1.0 models are supported.")
    return ours


def convert_fairseq_checkpoint(ckpt: dict) -> tuple[Wav2VecConfig, dict]:
    """(config, state dict) from a fairseq checkpoint dict with `args` (2019) or `cfg` (newer)."""
    args = ckpt.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(ckpt.get("cfg", {}).get("model", {}))
    if not args:
        raise UserError("The fairseq checkpoint has neither `args` nor `cfg.model`; cannot read its config.")
    return fairseq_config(args), fairseq_state_dict(ckpt["model"])
