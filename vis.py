"""Diagnostics of a checkpoint: the pictures to look at before trusting a run.

    python vis.py --checkpoint checkpoints/best_model.pt --data-dir DIR [--labels folder|pattern:REGEX|TSV]

Writes into --output-dir (default visualizations/):
    loss_curves.png             training loss (raw and smoothed), validation loss and accuracy, from the
                                history in the checkpoint (skipped when it has none, e.g. fairseq's)
    sample_NN_<name>.png        --num-samples files, spread over the list: waveform, log-mel spectrogram,
                                z and c on one time axis
    tsne.png, pca.png           2-D maps of frames (a bounded random sample; coloured by frame label where
                                the corpus has <name>.frames.npy beside its audio, as the demo corpus does)
                                and of files (mean over time)
    similarity_heatmap.png      cosine similarity between files, ordered by label
    self_similarity.png         cosine similarity between the frames of one file
    nearest_neighbours.csv/png  the k nearest files of every file, with distances and label agreement
    summary.txt, index.html     one paragraph of numbers, and a page that shows everything

--max-batches batches of --batch-size files are embedded; when the folder holds more, an evenly spaced
selection of the sorted file list is taken, so that every part of a sorted corpus (every digit of FSDD,
every speaker folder) appears. Each file is cut to its first --max-seconds; files of equal length share a
forward pass, others run alone (GroupNorm statistics span the whole input, so padding would change them).
Similarities are cosines of the features after subtracting the mean file embedding: features come out of
a ReLU, so raw cosines all sit near 1 and hide the structure. The summary's numbers are given twice: for
the checkpoint and for a randomly initialised network of the same configuration (--seed), the reference
that says what training added.
"""

from __future__ import annotations

import argparse
import csv
import html
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from data import SAMPLE_RATE, find_audio_files, load_audio, probe_audio, resampled_length
from features import LAYERS, cosine_matrix, equal_length_batches, is_random, load_network, random_network
from labels import (
    LABELS_HELP,
    frame_label_names,
    frame_label_path,
    labels_at_centres,
    natural_key,
    no_label_error,
    read_labels,
)
from model import Wav2Vec, read_checkpoint
from plots import (
    DPI,
    OTHER_COLOUR,
    add_legend,
    category_colours,
    evenly_spaced,
    plot_loss_curves,
    plot_sample,
    plot_self_similarity,
    plot_similarity_heatmap,
    project,
    shorten,
    tsne_caution,
    tsne_perplexity,
)
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_progress_argument,
    add_threads_argument,
    check_writable_dir,
    progress_bar,
    resolve_device,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)

MAX_NEIGHBOUR_ROWS = 24  # queries drawn in nearest_neighbours.png; the CSV holds all of them
UNLABELLED = "(no label)"
MAX_BATCH_SAMPLES = 60 * SAMPLE_RATE  # most audio in one forward pass: bounds memory for long files
REFERENCE = "a random network of the same configuration"
# Above this share of the file embeddings' variance along one direction, their mean-centred cosines sit near
# +1 or -1 (a file is on one side of the mean or the other): the heatmap is a checkerboard that says little.
ONE_DIRECTION_SHARE = 0.8
NN_COLUMNS = ("query", "query_label", "rank", "neighbour", "neighbour_label", "cosine_distance", "same_label")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; values argparse cannot check are a UserError."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--checkpoint", default="checkpoints/best_model.pt",
                    help="a checkpoint written by main.py or fairseq's wav2vec 1.0, or random:CKPT (the "
                         "network of CKPT's configuration, randomly initialised with --seed)")
    io.add_argument("--data-dir", type=Path, required=True, help="folder searched recursively for audio")
    io.add_argument("--labels", default=None,
                    help=f"colour and group files by label (default: by file): {LABELS_HELP}")
    io.add_argument("--label-column", default="label", help="TSV column (or pattern group) of the label")
    io.add_argument("--output-dir", type=Path, default=Path("visualizations"), help="where figures go")
    what = parser.add_argument_group("what to embed and draw")
    what.add_argument("--layer", choices=LAYERS, default="c",
                      help="features for the maps, similarities and neighbours: c (context, default) or z")
    what.add_argument("--max-batches", type=int, default=10,
                      help="batches of --batch-size files embedded; a folder with more files is thinned "
                           "evenly (the defaults embed up to 100 files)")
    what.add_argument("--num-samples", type=int, default=10, help="files that get a per-file figure")
    what.add_argument("--max-seconds", type=float, default=30.0, help="each file is cut to this length")
    what.add_argument("--max-frames", type=int, default=3000,
                      help="frames sampled for the frame-level t-SNE and PCA (bounds their time)")
    what.add_argument("--neighbours", type=int, default=5, help="nearest neighbours listed per file")
    what.add_argument("--seed", type=int, default=0,
                      help="seed of the frame sampling, of t-SNE and of the random reference network")
    what.add_argument("--random-reference", action=argparse.BooleanOptionalAction, default=True,
                      help="also embed the files with a randomly initialised network of the checkpoint's "
                           "configuration, whose numbers the summary gives beside the checkpoint's")
    compute = parser.add_argument_group("compute")
    add_device_argument(compute)
    compute.add_argument("--batch-size", type=int, default=10,
                         help="files read at a time; those of equal length share one forward pass")
    add_threads_argument(compute)
    add_progress_argument(compute)
    args = parser.parse_args(argv)
    if args.max_batches < 1 or args.batch_size < 1 or args.max_batches * args.batch_size < 2:
        raise UserError("Give --max-batches and --batch-size of at least 1 and at least 2 files in all "
                        "(--max-batches x --batch-size): the similarity figures compare files.")
    if args.num_samples < 0 or args.max_seconds <= 0 or args.max_frames < 10 or args.neighbours < 1:
        raise UserError("Give --num-samples >= 0, --max-seconds > 0, --max-frames >= 10, --neighbours >= 1.")
    return args


# ----- inputs -------------------------------------------------------------------------------------

def load_history(checkpoint: str) -> dict | None:
    """The training history stored in a checkpoint of main.py; None when there is none (fairseq files,
    random networks)."""
    history = None if is_random(checkpoint) else read_checkpoint(checkpoint).get("history")
    return history if history and history.get("train") else None








# ----- features -----------------------------------------------------------------------------------







@dataclass
class Embeddings:
    """One layer's features of the embedded files: a mean vector per file and a bounded sample of frames."""

    names: list[str]  # relative paths of the files embedded (unreadable ones left out)
    labels: list[str | None]  # one per file; None when no labels were given or the file has none
    utterances: np.ndarray  # (N, C): each file's frames averaged over time
    frames: np.ndarray  # (M, C): at most --max-frames frames drawn from all files
    frame_file: np.ndarray  # (M,): index into names of each sampled frame
    frame_labels: list[str] | None  # (M,): each sampled frame's own label; None when no file has frame labels
    reference: np.ndarray | None  # (N, C): the random reference network's per-file means, if it ran
    total_frames: int
    total_seconds: float
    example: np.ndarray  # (C, T): every frame of the first file, for its self-similarity
    skipped: list[str]  # relative paths of the files that could not be embedded


@dataclass
class FileFeatures:
    """One embedded file: its first --max-seconds at 16 kHz, its full length, and its features (C, T)."""

    wav: np.ndarray  # (L,)
    duration: float  # seconds, of the whole file
    z: np.ndarray
    c: np.ndarray
    reference: np.ndarray | None  # --layer of the random reference network


def read_start(path: Path, max_samples: int) -> tuple[np.ndarray, float]:
    """The first `max_samples` of a file at 16 kHz, wav (L,), decoding little more where the format allows
    it (a long recording is not read whole), and the file's full duration in seconds."""
    info = probe_audio(path)
    length = resampled_length(info.frames, info.sample_rate, SAMPLE_RATE)
    return load_audio(path, SAMPLE_RATE, num_samples=min(length, max_samples)), length / SAMPLE_RATE


def embed_batch(model: Wav2Vec, reference: Wav2Vec | None, paths: list[Path], max_samples: int,
                layer: str) -> list[FileFeatures | UserError]:
    """Features of one batch of files, in order; a UserError in place of a file that cannot be embedded
    (unreadable, or shorter than one frame). Files of equal length share a forward pass."""
    results: list[FileFeatures | UserError | None] = [None] * len(paths)
    read = {}
    for i, path in enumerate(paths):
        try:
            read[i] = read_start(path, max_samples)
        except UserError as err:
            results[i] = err
    positions = list(read)
    for batch in equal_length_batches([len(read[i][0]) for i in positions], MAX_BATCH_SAMPLES):
        members = [positions[j] for j in batch]
        wavs = np.stack([read[i][0] for i in members])  # (B, L)
        try:
            feats = model.extract_features(wavs)
            random_feats = None if reference is None else reference.extract_features(wavs)[layer]
        except UserError as err:  # shorter than one frame: so is every file of this length
            for i in members:
                results[i] = err
            continue
        z, c = (feats[key].float().cpu().numpy() for key in ("z", "c"))  # each (B, C, T)
        for j, i in enumerate(members):
            random_frames = None if random_feats is None else random_feats[j].float().cpu().numpy()
            results[i] = FileFeatures(read[i][0], read[i][1], z[j], c[j], random_frames)
    return results


def frame_labels_of(path: Path, num_frames: int, window: int, names: list[str] | None) -> np.ndarray | None:
    """(T,) the label of each feature frame from <name>.frames.npy beside the file (named by
    frame_labels.json where the corpus has one); None when the file has no frame labels."""
    if not frame_label_path(path).is_file():
        return None
    ids = labels_at_centres(np.load(frame_label_path(path)), num_frames, window)
    return np.array([names[i] if names and 0 <= i < len(names) else str(i) for i in ids.tolist()])


def embed_files(model: Wav2Vec, reference: Wav2Vec | None, files: list[Path], names: list[str],
                labels: list[str | None], args: argparse.Namespace
                ) -> tuple[Embeddings, list[tuple[str, str | None, FileFeatures]]]:
    """Run the model (and the reference network, if any) on every file, --batch-size files at a time; keep
    --num-samples of them whole, spread over the list as the files are, for their figures. Returns the
    embeddings and the samples (name, label, features)."""
    rng = np.random.default_rng(args.seed)
    max_samples = int(args.max_seconds * SAMPLE_RATE)
    per_file = math.ceil(args.max_frames / len(files))  # frames kept per file: memory stays bounded
    label_names = frame_label_names(args.data_dir)
    kept_names, kept_labels, means, random_means, sampled, owners, frame_labels, skipped, samples = \
        [], [], [], [], [], [], [], [], []
    total_frames, total_seconds, example = 0, 0.0, None
    to_draw = set(evenly_spaced(len(files), args.num_samples).tolist())
    owed = 0  # figures due: a file picked for one but unreadable passes it on to the next readable file
    with progress_bar(total=len(files), desc="extracting", unit="file") as progress:
        for begin in range(0, len(files), args.batch_size):
            paths = files[begin:begin + args.batch_size]
            batch = embed_batch(model, reference, paths, max_samples, args.layer)
            for position, result in enumerate(batch, start=begin):
                name, label = names[position], labels[position]
                owed += position in to_draw
                progress.update()
                if isinstance(result, UserError):  # unreadable, or shorter than one frame
                    log.warning("Skipping %s: %s", name, result)
                    skipped.append(name)
                    continue
                frames = result.c if args.layer == "c" else result.z
                if owed:
                    owed -= 1
                    samples.append((name, label, result))
                if example is None:
                    example = frames
                chosen = np.sort(rng.choice(frames.shape[1], min(per_file, frames.shape[1]), replace=False))
                sampled.append(frames[:, chosen].T)
                owners.append(np.full(len(chosen), len(kept_names)))
                own = frame_labels_of(files[position], frames.shape[1], model.receptive_field, label_names)
                frame_labels.append(np.full(len(chosen), UNLABELLED) if own is None else own[chosen])
                kept_names.append(name)
                kept_labels.append(label)
                means.append(frames.mean(axis=1))
                if result.reference is not None:
                    random_means.append(result.reference.mean(axis=1))
                total_frames += frames.shape[1]
                total_seconds += len(result.wav) / SAMPLE_RATE
    if len(kept_names) < 2:
        raise UserError(f"Only {len(kept_names)} of {len(files)} audio files could be embedded; "
                        "the figures compare files, so give a folder with at least two readable ones.")
    frames, owner, frame_label = np.concatenate(sampled), np.concatenate(owners), np.concatenate(frame_labels)
    if len(frames) > args.max_frames:
        chosen = np.sort(rng.choice(len(frames), args.max_frames, replace=False))
        frames, owner, frame_label = frames[chosen], owner[chosen], frame_label[chosen]
    has_frame_labels = bool((frame_label != UNLABELLED).any())
    embeddings = Embeddings(kept_names, kept_labels, np.stack(means), frames, owner,
                            frame_label.tolist() if has_frame_labels else None,
                            np.stack(random_means) if random_means else None, total_frames, total_seconds,
                            example, skipped)
    return embeddings, samples


def draw_samples(samples: list[tuple[str, str | None, FileFeatures]], model: Wav2Vec,
                 out: Path) -> list[tuple[str, str]]:
    """A figure per sample (waveform, log-mel, z and c); each figure's (file name, caption)."""
    figures = []
    for number, (name, label, result) in enumerate(samples):
        figure = f"sample_{number:02d}_{slug(name)}.png"
        plot_sample(result.wav, result.duration, result.z, result.c, model, name, label, out / figure)
        figures.append((figure, f"{name}{f' (label {label})' if label is not None else ''}: waveform, "
                                "log-mel spectrogram, latent z and context c on one time axis."))
    return figures


def slug(name: str) -> str:
    """A file-name-safe version of a relative audio path, without its extension."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).with_suffix("").as_posix())[-60:]


# ----- figures ------------------------------------------------------------------------------------















def plot_embedding_map(emb: Embeddings, categories: list[str], colour_by: str, frame_categories: list[str],
                       frame_colour_by: str, method: str, layer: str, seed: int, path: Path) -> None:
    """Two panels: sampled frames and per-file means, projected to 2-D, coloured by category (the frames by
    their own when they have frame labels)."""
    colours = category_colours(categories)
    frame_colours = colours if frame_colour_by == colour_by else category_colours(frame_categories)
    fig = Figure(figsize=(12.5, 5.5), layout="constrained")
    panels = (
        (emb.frames, frame_categories, frame_colours, 6, f"Frames: {len(emb.frames)} sampled of "
                                                         f"{emb.total_frames}"),
        (emb.utterances, categories, colours, 36, f"Files: {len(emb.utterances)} (mean over time)"),
    )
    rng = np.random.default_rng(seed)
    for ax, (points, point_categories, point_colours, size, title) in zip(fig.subplots(1, 2), panels,
                                                                           strict=True):
        start = time.perf_counter()
        xy, (xlabel, ylabel) = project(points, method, seed)
        log.info("%s of %d points took %.1f s", method, len(points), time.perf_counter() - start)
        if method == "tsne" and tsne_caution(len(points)):
            title += f"\ntoo few points for t-SNE (perplexity {tsne_perplexity(len(points)):.0f}): read PCA"
        order = rng.permutation(len(xy))  # random drawing order: no category hides under the last one drawn
        ax.scatter(xy[order, 0], xy[order, 1], s=size, linewidths=0, alpha=0.8,
                   c=[point_colours.get(point_categories[i], OTHER_COLOUR) for i in order])
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
    name = "t-SNE" if method == "tsne" else "PCA"
    if frame_colour_by == colour_by:
        fig.suptitle(f"{name} of {layer} features, coloured by {colour_by}")
        add_legend(fig, colours, categories, colour_by)
    else:
        fig.suptitle(f"{name} of {layer} features: frames coloured by {frame_colour_by}, "
                     f"files by {colour_by}")
        add_legend(fig, frame_colours, frame_categories, frame_colour_by, loc="outside left upper")
        add_legend(fig, colours, categories, colour_by)
    fig.savefig(path, dpi=DPI)








def nearest_neighbours(similarity: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices (N, k), cosine distances (N, k)) of each file's k most similar other files, nearest first."""
    distance = 1 - similarity
    np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return nearest, np.take_along_axis(distance, nearest, axis=1)


def same_label(labels: list[str | None], a: int, b: int) -> bool | None:
    """Whether files a and b share a label; None when either has none."""
    return None if labels[a] is None or labels[b] is None else labels[a] == labels[b]


def write_neighbours_csv(emb: Embeddings, nearest: np.ndarray, distance: np.ndarray, path: Path) -> None:
    """One row per (query, rank) with NN_COLUMNS; the label columns stay empty where there is no label."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(NN_COLUMNS)
        for query, row in enumerate(nearest):
            for rank, neighbour in enumerate(row):
                shared = same_label(emb.labels, query, neighbour)
                writer.writerow((emb.names[query], emb.labels[query] or "", rank + 1, emb.names[neighbour],
                                 emb.labels[neighbour] or "", f"{distance[query, rank]:.4f}",
                                 "" if shared is None else shared))


def plot_neighbours(emb: Embeddings, nearest: np.ndarray, distance: np.ndarray, order: np.ndarray,
                    layer: str, title_note: str, path: Path) -> None:
    """A grid: one row per query (at most MAX_NEIGHBOUR_ROWS, spread over the label order), one column per
    rank; each cell names the neighbour, is coloured by its distance and marked when it shares the label."""
    queries = order[evenly_spaced(len(order), MAX_NEIGHBOUR_ROWS)]
    k = nearest.shape[1]
    fig = Figure(figsize=(3.2 + 1.9 * k, 1.6 + 0.34 * len(queries)), layout="constrained")
    ax = fig.subplots()
    cells = distance[queries]
    image = ax.imshow(cells, cmap="viridis", aspect="auto")
    low, high = float(cells.min()), float(cells.max())
    for row, query in enumerate(queries):
        for rank, neighbour in enumerate(nearest[query]):
            shared = same_label(emb.labels, query, neighbour)
            mark = {True: "✓ ", False: "✗ ", None: ""}[shared]
            bright = (cells[row, rank] - low) / max(high - low, 1e-12) > 0.6  # viridis is light at the top
            ax.text(rank, row, mark + shorten(Path(emb.names[neighbour]).stem, 18), ha="center", va="center",
                    fontsize=7, fontweight="bold" if shared else "normal", color="k" if bright else "w")
    names = [shorten(emb.names[q], 28) + (f" [{emb.labels[q]}]" if emb.labels[q] is not None else "")
             for q in queries]
    ax.set_yticks(range(len(queries)), names, fontsize="small")
    ax.set_xticks(range(k), [str(rank + 1) for rank in range(k)])
    ax.set(xlabel="neighbour rank (1 = nearest)", ylabel="query file")
    ax.set_title(f"{k} nearest files by cosine distance ({layer}){title_note}")
    fig.colorbar(image, ax=ax, label="cosine distance (1 - similarity)", shrink=0.9)
    fig.savefig(path, dpi=DPI)


# ----- numbers and the page -----------------------------------------------------------------------

def first_component_share(points: np.ndarray) -> float:
    """The share of the variance of points (N, C) that lies along their first principal component."""
    singular = np.linalg.svd(points - points.mean(axis=0), compute_uv=False)
    return float(singular[0] ** 2 / max(float((singular**2).sum()), 1e-30))


def cautions(emb: Embeddings, share: float) -> list[str]:
    """What makes this run's pictures misleading: maps of too few points for t-SNE, and file embeddings whose
    variance lies along one direction (`share` of it: first_component_share), a saturated heatmap."""
    found = [f"{what} {note}" for what, points in (("the frames' map:", emb.frames),
                                                   ("the files' map:", emb.utterances))
             if (note := tsne_caution(len(points)))]
    if share > ONE_DIRECTION_SHARE:
        found.append(f"{100 * share:.0f}% of the variance of the file embeddings lies along one direction, "
                     "so their similarities sit near +1 or -1 (the heatmap's checkerboard) and say little "
                     "more than on which side of the mean a file falls")
    return found


def within_between(similarity: np.ndarray, labels: list[str | None]) -> tuple[float, float]:
    """Mean similarity over pairs of labelled files that share a label, and over pairs that do not."""
    known = np.array([label is not None for label in labels])
    values = np.array(labels, dtype=object)
    pairs = np.triu(np.outer(known, known), k=1)  # each unordered pair of labelled files once
    same = pairs & (values[:, None] == values[None, :])
    means = [float(similarity[mask].mean()) if mask.any() else math.nan for mask in (same, pairs & ~same)]
    return means[0], means[1]


def label_agreement(nearest: np.ndarray, labels: list[str | None]) -> tuple[float, float]:
    """(fraction of labelled neighbours that share the query's label, that fraction for random neighbours)."""
    shared = [same_label(labels, q, n) for q, row in enumerate(nearest) for n in row]
    shared = [s for s in shared if s is not None]
    counts = np.array(list(Counter(label for label in labels if label is not None).values()))
    total = counts.sum()
    chance = float((counts * (counts - 1)).sum() / (total * (total - 1))) if total > 1 else math.nan
    return (float(np.mean(shared)) if shared else math.nan), chance


def file_similarity(utterances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cosine similarity (N, N) of the mean-centred file embeddings (N, C), each file's k nearest other
    files (N, k), their cosine distances (N, k)); see the module docstring for the centring."""
    centred = utterances - utterances.mean(axis=0)
    similarity = cosine_matrix(centred, centred)
    return (similarity, *nearest_neighbours(similarity, k))


def summary_numbers(similarity: np.ndarray, nearest: np.ndarray,
                    labels: list[str | None]) -> dict[str, float]:
    """Mean similarity within and between labels, and the share of nearest neighbours with the query's label
    (and that share by chance)."""
    within, between = within_between(similarity, labels)
    agreement, chance = label_agreement(nearest, labels)
    return {"within": within, "between": between, "k": nearest.shape[1], "agreement": agreement,
            "chance": chance}


def summary_text(args: argparse.Namespace, model: Wav2Vec, history: dict | None, emb: Embeddings,
                 found: int, selected: int, numbers: dict[str, float],
                 reference: dict[str, float] | None, notes: list[str] | None = None) -> str:
    """One paragraph: the checkpoint, what was embedded, and how well the features group by label, beside
    the same numbers for a random network of the same configuration (`reference`) when it ran; then what
    makes a picture misleading (`notes`, from cautions)."""
    cfg = model.config
    checkpoint = (f"Checkpoint {args.checkpoint} ({len(cfg.encoder_layers)} encoder and "
                  f"{len(cfg.context_layers)} context layers, {cfg.context_layers[-1][0]} channels, "
                  f"{model.num_parameters():,} parameters)")
    if history:
        last, valid = history["train"][-1], history.get("valid")
        checkpoint += (f", trained for {last['step']:,} updates (last epoch {last['epoch']}, last training "
                       f"loss {last['loss']:.3f} nats"
                       + (f", last validation loss {valid[-1]['loss']:.3f} nats)" if valid else ")"))
    else:
        checkpoint += ", without a training history (no loss curves)"
    parts = [checkpoint,
             f"Layer {args.layer}: {len(emb.names)} of {selected} selected files embedded ({found} found "
             f"under {args.data_dir}; {len(emb.skipped)} unreadable or too short, skipped), "
             f"{emb.total_frames:,} frames ({emb.total_seconds:.1f} s of audio, each file cut to "
             f"{args.max_seconds:g} s); the maps show {len(emb.frames):,} sampled frames"]
    if args.labels:
        distinct = len({label for label in emb.labels if label is not None})
        unlabelled = sum(label is None for label in emb.labels)
        parts += [f"Labels from {args.labels}: {distinct} distinct"
                  + (f", {unlabelled} files without one" if unlabelled else ""),
                  f"Mean cosine similarity (mean-centred) between file embeddings: {numbers['within']:.3f} "
                  f"within a label versus {numbers['between']:.3f} between labels"
                  + (f" ({REFERENCE}: {reference['within']:.3f} versus {reference['between']:.3f})"
                     if reference else ""),
                  f"Of each file's {numbers['k']} nearest neighbours, {100 * numbers['agreement']:.0f}% "
                  "share its label ("
                  + (f"{REFERENCE}: {100 * reference['agreement']:.0f}%; " if reference else "")
                  + f"chance {100 * numbers['chance']:.0f}%)"]
    else:
        parts.append("No labels were given, so within- versus between-label similarity is not reported; the "
                     f"mean cosine similarity (mean-centred) between files is {numbers['between']:.3f}"
                     + (f" ({REFERENCE}: {reference['between']:.3f})" if reference else ""))
    parts += [f"Caution, {note}" for note in notes or []]
    return ". ".join(parts) + "."


def write_index(path: Path, summary: str, figures: list[tuple[str, str]]) -> None:
    """index.html: the summary, a link to the neighbours table, then every figure with its caption."""
    items = "\n".join(f'<figure><img src="{html.escape(name)}" alt="{html.escape(name)}">'
                      f"<figcaption><b>{html.escape(name)}</b>: {html.escape(caption)}</figcaption></figure>"
                      for name, caption in figures)
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wav2vec diagnostics</title>
<style>body {{font-family: sans-serif; max-width: 1300px; margin: 2em auto; padding: 0 1em}}
figure {{margin: 2.5em 0}} img {{max-width: 100%; border: 1px solid #ddd}} figcaption {{color: #333}}</style>
</head><body>
<h1>wav2vec diagnostics</h1>
<p>{html.escape(summary)}</p>
<p>Nearest neighbours as a table: <a href="nearest_neighbours.csv">nearest_neighbours.csv</a>.</p>
{items}
</body></html>
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Load the checkpoint, embed the files, write every figure, the table, the summary and the page."""
    args = parse_args(argv)
    setup_logging(progress=args.progress)
    check_writable_dir(args.output_dir, "--output-dir")  # before the work; made once the files are embedded
    set_threads(args.threads)
    start = time.perf_counter()
    device = resolve_device(args.device)
    model = load_network(args.checkpoint, args.seed, device, needs="a wav2vec network to draw")
    # What the summary's numbers would be without training.
    reference = random_network(model.config, args.seed, device) if args.random_reference else None
    history = load_history(args.checkpoint)
    found = find_audio_files(args.data_dir)
    if not found:
        raise UserError(f"No audio files under {args.data_dir}; check --data-dir.")
    # --max-batches x --batch-size files, evenly spaced: see the module docstring
    files = [found[i] for i in evenly_spaced(len(found), args.max_batches * args.batch_size)]
    names = [f.relative_to(args.data_dir).as_posix() for f in files]
    labels = (read_labels(names, args.labels, args.data_dir, label_column=args.label_column)[0] if args.labels
              else [None] * len(files))
    if args.labels and all(label is None for label in labels):
        raise no_label_error(args.labels, len(files), args.data_dir)
    out = args.output_dir
    log.info("%s on %s: embedding %d of %d files from %s, layer %s", args.checkpoint, device, len(files),
             len(found), args.data_dir, args.layer)

    emb, samples = embed_files(model, reference, files, names, labels, args)
    out.mkdir(parents=True, exist_ok=True)  # enough files were embedded: the figures can be drawn
    figures = []
    if history:
        plot_loss_curves(history, model.config, out / "loss_curves.png")
        figures.append(("loss_curves.png", "Training loss per update (raw and smoothed), validation loss per "
                                           "epoch; accuracy overall and per prediction step when recorded."))
    else:
        log.info("%s holds no training history: skipping the loss curves.", args.checkpoint)
    sample_figures = draw_samples(samples, model, out)
    colour_by = "label" if args.labels else "file"
    categories = ([UNLABELLED if label is None else label for label in emb.labels] if args.labels
                  else emb.names)
    frame_colour_by = "frame label" if emb.frame_labels else colour_by
    frame_categories = emb.frame_labels or [categories[i] for i in emb.frame_file]
    for method in ("tsne", "pca"):
        plot_embedding_map(emb, categories, colour_by, frame_categories, frame_colour_by, method, args.layer,
                           args.seed, out / f"{method}.png")

    k = min(args.neighbours, len(emb.names) - 1)
    similarity, nearest, distance = file_similarity(emb.utterances, k)
    grouping = emb.labels if args.labels else list(emb.names)  # without labels, every file is its own group
    numbers = summary_numbers(similarity, nearest, grouping)
    reference_numbers = (None if emb.reference is None
                         else summary_numbers(*file_similarity(emb.reference, k)[:2], grouping))
    within, between = numbers["within"], numbers["between"]
    agreement, chance = numbers["agreement"], numbers["chance"]
    centre = emb.utterances.mean(axis=0)  # for the self-similarity, centred like the files
    order = np.array(sorted(range(len(emb.names)), key=lambda i: (natural_key(categories[i]), emb.names[i])))
    similarity_note = f"\nwithin label {within:.2f}, between labels {between:.2f}" if args.labels else ""
    share = first_component_share(emb.utterances)
    if share > ONE_DIRECTION_SHARE:
        similarity_note += f"\none direction holds {100 * share:.0f}% of the variance: similarities saturate"
    plot_similarity_heatmap(similarity, order, categories, colour_by, args.layer, similarity_note,
                            out / "similarity_heatmap.png")
    plot_self_similarity(emb.example, centre, model, emb.names[0], args.layer, out / "self_similarity.png")
    write_neighbours_csv(emb, nearest, distance, out / "nearest_neighbours.csv")
    agreement_note = f"\n{100 * agreement:.0f}% share the query's label (chance {100 * chance:.0f}%)"
    plot_neighbours(emb, nearest, distance, order, args.layer, agreement_note if args.labels else "",
                    out / "nearest_neighbours.png")

    figures += sample_figures + [
        ("tsne.png", f"t-SNE of {args.layer} features: sampled frames (left, coloured by {frame_colour_by}) "
                     f"and per-file means (right, coloured by {colour_by})."),
        ("pca.png", "The first two principal components of the same frames and files, coloured the same."),
        ("similarity_heatmap.png", "Cosine similarity between per-file mean embeddings (after subtracting "
                                   f"their mean), files grouped by {colour_by}."),
        ("self_similarity.png", f"Cosine similarity between every pair of frames of {emb.names[0]}."),
        ("nearest_neighbours.png", f"The {k} nearest files of a spread of query files (every file is in "
                                   "nearest_neighbours.csv); ✓ marks a neighbour with the query's label."),
    ]
    notes = cautions(emb, share)
    for note in notes:
        log.warning("Caution, %s", note)
    summary = summary_text(args, model, history, emb, len(found), len(files), numbers, reference_numbers,
                           notes)
    (out / "summary.txt").write_text(summary + "\n", encoding="utf-8")
    write_index(out / "index.html", summary, figures)
    log.info("%s", summary)
    log.info("wrote %d figures, nearest_neighbours.csv, summary.txt and index.html to %s in %.1f s",
             len(figures), out, time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
