"""The figures: vis.py's of a checkpoint, finetune.py's of its results, suite.py's learning curve.

Figures are built without pyplot, so they render with Agg: no display, no global figure state. imshow keeps
matplotlib's default interpolation, which anti-aliases images with more rows than pixels (512 channels, 3000
frames) instead of dropping rows.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix

from data import FRAME_HOP, SAMPLE_RATE
from features import MEL_BANDS, SPECTROGRAM_WINDOW, cosine_matrix, hz_to_mel, log_mel_spectrogram
from labels import natural_key
from model import Wav2Vec, Wav2VecConfig

log = logging.getLogger(__name__)

MEL_TICKS_HZ = (100, 500, 1000, 2000, 4000, 8000)
MAX_COLOURS = 20  # categories with their own colour and legend entry; rarer ones share grey "other"
OTHER_COLOUR = (0.75, 0.75, 0.75, 1.0)
MAX_TICK_LABELS = 40  # beyond this many files or label groups, heatmap ticks would overlap
TSNE_PCA_DIMS = 50  # t-SNE runs on this many principal components: much faster, nearly the same map
# On 3000 FSDD frames (32-channel random model), 750 iterations end within 2% of the KL divergence of
# sklearn's default 1000 in 3/4 of the time; 500 leave it 9% higher.
TSNE_ITERATIONS = 750
# sklearn's default perplexity, which needs more than 3 x 30 points; fewer get a lower one, and a map that
# tells little (40 files came out as a line).
TSNE_PERPLEXITY = 30.0
# Exact t-SNE below this many points: its O(n^2) gradient is cheaper there than Barnes-Hut's tree and
# threads (10 points: 0.1 s instead of 2 s on two busy cores).
TSNE_EXACT_BELOW = 200
DPI = 130


def evenly_spaced(n: int, limit: int) -> np.ndarray:
    """At most `limit` distinct indices into range(n), evenly spaced from the first to the last."""
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(int))

def shorten(text: str, width: int) -> str:
    """`text`, cut from the left to at most `width` characters: the end of a path says the most."""
    return text if len(text) <= width else "…" + text[-(width - 1):]

def frame_extent(num_frames: int, window: int, hop: int = FRAME_HOP) -> tuple[float, float]:
    """(first edge, last edge) in seconds of `num_frames` frames drawn as hop-wide columns centred on their
    windows [hop t, hop t + window): what puts the spectrogram, z and c on one time axis."""
    left = (window - hop) / 2 / SAMPLE_RATE
    return left, left + num_frames * hop / SAMPLE_RATE

def smooth(values: Sequence[float], updates: Sequence[int]) -> np.ndarray:
    """Debiased exponential moving average (as TensorBoard's) over about a twentieth of the updates, each
    value weighing as many updates as it covers: a record of one update moves it little."""
    keep = 1 - 1 / max(1.0, sum(updates) / 20)  # per update
    out, average, total = [], 0.0, 0
    for value, count in zip(values, updates, strict=True):
        average = keep**count * average + (1 - keep**count) * value
        total += count
        out.append(average / (1 - keep**total))  # undo the pull towards the initial 0
    return np.array(out)

def plot_loss_curves(history: dict, config: Wav2VecConfig, path: Path) -> None:
    """Loss (nats, with bits on the right axis), accuracy, and accuracy per prediction step when recorded."""
    train, valid = history["train"], history.get("valid", [])
    has_accuracy = all("accuracy" in entry for entry in train)
    has_per_step = all("accuracy_per_step" in entry for entry in train)
    panels = 1 + has_accuracy + has_per_step
    fig = Figure(figsize=(5.2 * panels, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, panels))
    steps = [entry["step"] for entry in train]
    updates = np.maximum(1, np.diff(steps, prepend=0)).tolist()  # updates each record covers

    def curves(ax, key: str, scale: float) -> None:  # raw and smoothed training values, validation dots
        values = [entry[key] * scale for entry in train]
        ax.plot(steps, values, color="C0", lw=0.8, alpha=0.35, label="train (raw)")
        ax.plot(steps, smooth(values, updates), color="C0", lw=2, label="train (smoothed)")
        if valid and all(key in entry for entry in valid):
            ax.plot([entry["step"] for entry in valid], [entry[key] * scale for entry in valid], "o-",
                    color="C1", ms=4, label="validation (per epoch)")
        ax.set_xlabel("update step")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)

    curves(axes[0], "loss", 1.0)
    axes[0].set(ylabel=f"{config.loss_type} loss (nats)", title="Loss")
    bits = axes[0].secondary_yaxis("right", functions=(lambda x: x / math.log(2), lambda x: x * math.log(2)))
    bits.set_ylabel("loss (bits)")
    if has_accuracy:
        curves(axes[1], "accuracy", 100.0)
        axes[1].set(ylabel="accuracy (%)", title="Accuracy (positive above every distractor)")
    if has_per_step:
        plot_accuracy_per_step(axes[-1], train, config.resolved_offset)
    fig.suptitle(f"Training history: {len(train)} records, {len(valid)} validations")
    fig.savefig(path, dpi=DPI)

def plot_accuracy_per_step(ax, train: list[dict], offset: int) -> None:
    """Mean training accuracy for each prediction step k, for up to five epochs from first to last."""
    by_epoch: dict[int, list] = {}
    for entry in train:
        by_epoch.setdefault(entry["epoch"], []).append(entry["accuracy_per_step"])
    epochs = sorted(by_epoch)
    shown = [epochs[i] for i in evenly_spaced(len(epochs), 5)]
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(shown)))
    for epoch, colour in zip(shown, colours, strict=True):
        accuracy = 100 * np.mean(by_epoch[epoch], axis=0)
        ax.plot(np.arange(1, len(accuracy) + 1), accuracy, "o-", color=colour, ms=3, label=f"epoch {epoch}")
    ax.set(xlabel=f"prediction step k (target: z at frame t + {offset} + k - 1)",
           ylabel="training accuracy (%)", title="Accuracy per prediction step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)

def plot_sample(wav: np.ndarray, duration: float, z: np.ndarray, c: np.ndarray, model: Wav2Vec,
                name: str, label: str | None, path: Path) -> None:
    """Waveform, log-mel spectrogram, z (C, T) and c (C, T) of one file, stacked on one time axis."""
    fig = Figure(figsize=(11, 8.5), layout="constrained")
    grid = fig.add_gridspec(4, 2, width_ratios=(60, 1), height_ratios=(1, 1.3, 1.3, 1.3))
    top = fig.add_subplot(grid[0, 0])
    axes = [top] + [fig.add_subplot(grid[row, 0], sharex=top) for row in (1, 2, 3)]
    colourbars = [fig.add_subplot(grid[row, 1]) for row in (1, 2, 3)]

    seconds = np.arange(len(wav)) / SAMPLE_RATE
    top.plot(seconds, wav, color="C0", lw=0.4)
    peak = max(float(np.abs(wav).max()), 1e-3)
    top.set(ylim=(-1.05 * peak, 1.05 * peak), ylabel="amplitude\n(full scale = 1)", title="Waveform",
            xlim=(0, len(wav) / SAMPLE_RATE))

    image = draw_log_mel(axes[1], wav)
    fig.colorbar(image, cax=colourbars[0], label="power (dB re. loudest)")

    titles = {"z": f"Latent z (encoder output, {z.shape[0]} channels, one frame per 10 ms)",
              "c": f"Context c (context network output, {c.shape[0]} channels)"}
    for ax, cax, (key, feats) in zip(axes[2:], colourbars[1:], (("z", z), ("c", c)), strict=True):
        low, high = np.percentile(feats, (1, 99))  # robust limits: a few large activations would wash it out
        left, right = frame_extent(feats.shape[1], model.receptive_field, model.config.stride)
        image = ax.imshow(feats, aspect="auto", origin="lower", cmap="viridis", vmin=low,
                          vmax=max(high, low + 1e-6), extent=(left, right, -0.5, feats.shape[0] - 0.5))
        ax.set(ylabel=f"{key} channel", title=titles[key])
        fig.colorbar(image, cax=cax, label="activation (a.u.)")
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel("time (s)")
    cut = f", first {len(wav) / SAMPLE_RATE:.1f} s shown" if len(wav) / SAMPLE_RATE < duration else ""
    fig.suptitle(f"{name}{f'  [label: {label}]' if label is not None else ''}: {duration:.2f} s{cut}, "
                 f"{z.shape[1]} frames")
    fig.savefig(path, dpi=DPI)

def draw_log_mel(ax, wav: np.ndarray):
    """Draw the log-mel spectrogram of wav (L,) on `ax`, frames centred on their windows, ticks in Hz; returns
    the image (for a colour bar)."""
    mel = log_mel_spectrogram(wav)
    left, right = frame_extent(mel.shape[1], SPECTROGRAM_WINDOW)
    image = ax.imshow(mel, aspect="auto", origin="lower", cmap="magma", extent=(left, right, 0, MEL_BANDS))
    top_mel = hz_to_mel(SAMPLE_RATE / 2)
    ticks = [hz for hz in MEL_TICKS_HZ if hz <= SAMPLE_RATE / 2]
    ax.set_yticks([hz_to_mel(hz) / top_mel * MEL_BANDS for hz in ticks], [f"{hz:g}" for hz in ticks])
    ax.set(ylabel="frequency (Hz,\nmel scale)",
           title=f"Log-mel spectrogram ({MEL_BANDS} bands, 25 ms window)")
    return image

def category_colours(categories: list[str]) -> dict[str, tuple]:
    """A colour for each category, or for the most frequent ones when there are more than MAX_COLOURS:
    the rest share grey "other" (OTHER_COLOUR), so the palette's own greys are then left out."""
    counts = Counter(categories)
    palette = list(matplotlib.colormaps["tab10" if len(counts) <= 10 else "tab20"].colors)
    if len(counts) > MAX_COLOURS:
        palette = [colour for colour in palette if len(set(colour)) > 1]  # a grey has r == g == b
        counts = Counter(dict(counts.most_common(len(palette))))
    return {category: palette[i] for i, category in enumerate(sorted(counts, key=natural_key))}

def add_legend(fig: Figure, colours: dict[str, tuple], categories: list[str], title: str,
               loc: str = "outside right upper") -> None:
    """A legend beside the panels: an entry per coloured category, and one for the grey rest."""
    handles = [Line2D([], [], marker="o", ls="", color=colour, label=shorten(category, 28))
               for category, colour in colours.items()]
    others = len(set(categories) - set(colours))
    if others:
        handles.append(Line2D([], [], marker="o", ls="", color=OTHER_COLOUR, label=f"other ({others})"))
    fig.legend(handles=handles, loc=loc, title=title, fontsize="small")

def project(points: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, tuple[str, str]]:
    """points (n, C) -> 2-D coordinates (n, 2) by PCA or t-SNE, and the two axis labels."""
    if method == "pca":
        pca = PCA(2, random_state=seed).fit(points)
        ratios = pca.explained_variance_ratio_
        return pca.transform(points), (f"PC 1 ({100 * ratios[0]:.0f}% of variance)",
                                       f"PC 2 ({100 * ratios[1]:.0f}% of variance)")
    reduced = PCA(min(TSNE_PCA_DIMS, *points.shape), random_state=seed).fit_transform(points)
    perplexity = tsne_perplexity(len(points))
    gradient = "exact" if len(points) < TSNE_EXACT_BELOW else "barnes_hut"
    tsne = TSNE(2, perplexity=perplexity, init="pca", method=gradient, max_iter=TSNE_ITERATIONS,
                random_state=seed)
    return tsne.fit_transform(reduced), ("t-SNE 1 (a.u.)", "t-SNE 2 (a.u.)")

def tsne_perplexity(points: int) -> float:
    """sklearn's default, or less where there are too few points for it (it must stay below their number)."""
    return min(TSNE_PERPLEXITY, max(1.0, (points - 1) / 3))

def tsne_caution(points: int) -> str | None:
    """Why a t-SNE map of `points` points is not to be read, or None when there are enough of them."""
    if tsne_perplexity(points) >= TSNE_PERPLEXITY:
        return None
    return (f"t-SNE of {points} points ran at perplexity {tsne_perplexity(points):.0f} (its usual "
            f"{TSNE_PERPLEXITY:.0f} needs more than {3 * TSNE_PERPLEXITY:.0f} points): too few for a map to "
            "trust; read pca.png")

def group_ticks(ax, ordered: list[str], axis_label: str) -> None:
    """Ticks for a matrix whose rows are grouped: one per run of equal names, with lines between runs."""
    starts = [i for i in range(len(ordered)) if i == 0 or ordered[i] != ordered[i - 1]]
    ends = starts[1:] + [len(ordered)]
    grouped = len(starts) < len(ordered)  # lines only when groups hold several rows, not one per file
    for boundary in starts[1:] if grouped else []:
        ax.axhline(boundary - 0.5, color="white", lw=0.6)
        ax.axvline(boundary - 0.5, color="white", lw=0.6)
    if len(starts) <= MAX_TICK_LABELS:
        centres = [(start + end - 1) / 2 for start, end in zip(starts, ends, strict=True)]
        names = [shorten(ordered[start], 24) for start in starts]
        ax.set_xticks(centres, names, rotation=90, fontsize="small")
        ax.set_yticks(centres, names, fontsize="small")
    else:  # too many names to print: keep the numeric ticks (row indices)
        axis_label += " (index)"
    ax.set(xlabel=axis_label, ylabel=axis_label)

def plot_similarity_heatmap(similarity: np.ndarray, order: np.ndarray, categories: list[str], colour_by: str,
                            layer: str, title_note: str, path: Path) -> None:
    """Cosine similarity (N, N) between files, rows and columns in `order` (grouped by label)."""
    fig = Figure(figsize=(8.5, 7.5), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(similarity[np.ix_(order, order)], cmap="viridis", vmin=-1, vmax=1)
    ordered = [categories[i] for i in order]
    group_ticks(ax, ordered, f"file (grouped by {colour_by})" if colour_by == "label" else "file")
    fig.colorbar(image, ax=ax, label="cosine similarity (mean-centred)", shrink=0.85)
    ax.set_title(f"Similarity between files ({layer}, mean over time){title_note}")
    fig.savefig(path, dpi=DPI)

def plot_self_similarity(frames: np.ndarray, centre: np.ndarray, model: Wav2Vec, name: str, layer: str,
                         path: Path) -> None:
    """Cosine similarity between every pair of frames (C, T) of one file, both axes in seconds."""
    centred = frames.T - centre
    left, right = frame_extent(frames.shape[1], model.receptive_field, model.config.stride)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cosine_matrix(centred, centred), cmap="viridis", vmin=-1, vmax=1, origin="lower",
                      extent=(left, right, left, right))
    ax.set(xlabel="time (s)", ylabel="time (s)",
           title=f"Frame-by-frame similarity of {shorten(name, 40)} ({layer})")
    fig.colorbar(image, ax=ax, label="cosine similarity (mean-centred)", shrink=0.85)
    fig.savefig(path, dpi=DPI)


def plot_results(classes: Sequence[str], true: Sequence, predicted: Sequence, path: Path, title: str) -> None:
    """A confusion matrix over `classes` (classification), or predicted against true values (regression,
    no classes)."""
    fig = Figure(figsize=(6, 5.5))
    ax = fig.subplots()
    if classes:
        counts = confusion_matrix(true, predicted, labels=list(classes))
        image = ax.imshow(counts, cmap="Blues")
        fig.colorbar(image, ax=ax)
        ticks = range(len(classes))
        ax.set_xticks(ticks, classes, rotation=90 if len(classes) > 12 else 0)
        ax.set_yticks(ticks, classes)
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > counts.max() / 2 else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        ax.scatter(true, predicted, s=6, alpha=0.5)
        low, high = min(np.min(true), np.min(predicted)), max(np.max(true), np.max(predicted))
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def draw_learning_curve(curve: Sequence[dict], baselines: dict[str, float], path: Path, title: str) -> None:
    """z and c accuracy against training minutes, each baseline (name -> accuracy) a horizontal line."""
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    minutes = [point["train_minutes"] for point in curve]
    colours = {"z": "tab:blue", "c": "tab:orange"}
    for layer, colour in colours.items():
        accuracy = [point[layer] for point in curve]
        axes.plot(minutes, accuracy, "o-", color=colour, label=f"pre-trained {layer}")
    for name, accuracy in baselines.items():  # MFCC grey and solid, random dashed in its layer's colour
        layer = name.rsplit(" ", 1)[-1]
        axes.axhline(accuracy, color=colours.get(layer, "gray"), linestyle="--" if layer in colours else "-",
                     label=name)
    axes.set(xlabel="training minutes", ylabel="accuracy", title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


POSTERIOR_SHOWN = 0.1  # a symbol gets a row in a posteriorgram if its posterior reaches this somewhere


def plot_posteriorgram(files: Sequence[dict], symbols: Sequence[str], window: int, hop: int, path: Path,
                       title: str) -> None:
    """For each file ({"name", "wav" (L,), "posteriors" (T, V), "reference", "transcript"}): its log-mel
    spectrogram above its frame-by-frame CTC posteriors (symbols[0] is the blank; a row for every symbol that
    reaches POSTERIOR_SHOWN or is in the reference or the transcript), both on one time axis (output frame t
    covers samples [hop t, hop t + window)), with the reference and the transcript written under it."""
    fig = Figure(figsize=(12, 5.2 * len(files)), layout="constrained")
    rows = fig.subfigures(len(files), 1, squeeze=False)[:, 0]
    for row, item in zip(rows, files, strict=True):
        spectrogram, posteriors = row.subplots(2, 1, sharex=True, height_ratios=(1, 1.6))
        draw_log_mel(spectrogram, item["wav"])
        spectrogram.set_title(f"{shorten(item['name'], 60)}: {len(item['wav']) / SAMPLE_RATE:.2f} s",
                              fontsize=10)
        words = set(item["reference"].split()) | set(item["transcript"].split())
        probabilities = item["posteriors"]
        shown = [i for i, symbol in enumerate(symbols)
                 if i == 0 or probabilities[:, i].max() >= POSTERIOR_SHOWN or symbol in words
                 or (len(symbol) == 1 and symbol in item["reference"] + item["transcript"])]
        left, right = frame_extent(len(probabilities), window, hop)
        image = posteriors.imshow(probabilities[:, shown].T, aspect="auto", origin="lower", cmap="Greys",
                                  vmin=0, vmax=1, interpolation="nearest",
                                  extent=(left, right, -0.5, len(shown) - 0.5))
        posteriors.set_yticks(range(len(shown)), [symbols[i] for i in shown], fontsize=7)
        posteriors.set(ylabel="symbol", xlabel="time (s)", title=f"CTC posteriors per {hop // 16} ms frame")
        row.colorbar(image, ax=posteriors, label="posterior", shrink=0.8)
        posteriors.text(0, -0.22, f"reference:  {item['reference']}\ntranscript: {item['transcript']}",
                        transform=posteriors.transAxes, va="top", fontsize=9, family="monospace", wrap=True)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
