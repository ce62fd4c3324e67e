"""The standard probe table in one command: `z` and `c` of each checkpoint beside MFCC and random-init rows.

    python suite.py fsdd --data-dir FSDD --checkpoint CKPT [CKPT ...] [--output-dir runs/suite]
    python suite.py fsdd --data-dir FSDD --checkpoint RUN_DIR --output-dir runs/suite

Four tasks, each exactly the single probe.py command of the evaluation in docs/RESULTS.md (logistic
regression on standardised mean+std pooled features, same folds and seeds), so the numbers are the same:
- digits, leave-one-speaker-out: --labels fsdd-digit --group-column speaker
- digits, official split:        --labels fsdd-digit --split fsdd-official
- speaker ID:                    --labels fsdd-speaker (stratified 5-fold)
- demo corpus, frame labels:     --frame-level on --frames-dir (default: a demo corpus synthesised into
                                 --cache-dir, the same as `python main.py --demo` writes to data/demo)
Rows: MFCC, a random network of each checkpoint configuration (`random:CKPT`, seeded; checkpoints of one
configuration share it), then `z` and `c` of each checkpoint. One forward pass gives both layers, and the
pooled FSDD features serve all three FSDD tasks.

--checkpoint RUN_DIR (a main.py output folder) takes its checkpoint_<step>.pt and latest.pt. Checkpoints are
ordered by the training time stored in them (`train_seconds`); each gets the leave-one-speaker-out score,
the longest-trained (and any without `train_seconds`, such as fairseq's, listed last) the whole table. With
two or more timed checkpoints, the output folder gets learning_curve.png: accuracy against training minutes
for `z` and `c`, MFCC and random init as horizontal lines.

Every score is cached in --cache-dir under a key of its inputs (the files' sizes and times, the checkpoint
file or, for random networks, the configuration, and the probe settings): a second run recomputes only
what changed. The Markdown table goes to stdout and to table.md, every number (per fold, seconds) to
results.json in --output-dir (and to --json if given).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import probe
from data import find_audio_files
from demo import make_demo_corpus
from features import FramesOf, featurizer, file_frames, load_network, model_layers, pool
from labels import LabelledFiles, frame_label_path, read_labels
from model import Wav2VecConfig, checkpoint_weights, read_checkpoint
from plots import draw_learning_curve
from utils import (
    HelpFormatter,
    UserError,
    add_device_argument,
    add_progress_argument,
    add_renamed,
    add_threads_argument,
    check_writable_dir,
    ensure_writable_file,
    resolve_device,
    run_cli,
    set_threads,
    setup_logging,
)

log = logging.getLogger(__name__)

POOL = "mean+std"
TASKS = {  # name -> (table heading, the single probe's flags)
    "digits_loso": ("digits, leave-one-speaker-out", ["--labels", "fsdd-digit", "--group-column", "speaker"]),
    "digits_official": ("digits, official split", ["--labels", "fsdd-digit", "--split", "fsdd-official"]),
    "speaker_id": ("speaker ID (5-fold)", ["--labels", "fsdd-speaker"]),
    "frames": ("demo corpus, frame labels", ["--frame-level"]),
}
CURVE_TASK = "digits_loso"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:  # probe.py --suite NAME ... (the old form) hands its own command line over
        at = argv.index("--suite")
        argv = argv[at + 1:at + 2] + argv[:at] + argv[at + 2:]
    parser = argparse.ArgumentParser(prog="suite.py", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("suite", choices=("fsdd",), help="the table to compute")
    parser.add_argument("--data-dir", type=Path, required=True,
                        help="FSDD recordings, named {digit}_{speaker}_{index}.wav")
    parser.add_argument("--checkpoint", nargs="+",
                        help="checkpoints (ours or fairseq's), or main.py output folders")
    add_renamed(parser, "--features", "--checkpoint", nargs="+")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/suite"),
                        help="where results.json, table.md and learning_curve.png go")
    parser.add_argument("--json", type=Path, help="also write every number to this file")
    parser.add_argument("--frames-dir", type=Path,
                        help="a corpus with <name>.frames.npy beside <name>.wav (default: a demo corpus "
                             "synthesised into --cache-dir/demo when absent)")
    parser.add_argument("--cache-dir", type=Path, default=Path("probe_cache"),
                        help="pooled features and scores, reused while their inputs stay the same")
    parser.add_argument("--folds", type=int, default=5, help="folds of the speaker-ID and frame-label tasks")
    parser.add_argument("--max-frames", type=int, default=50000, help="frames kept for the frame-label task")
    parser.add_argument("--max-iter", type=int, default=5000, help="iteration limit of the regression")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random networks, folds, frames")
    add_device_argument(parser)
    add_threads_argument(parser)
    add_progress_argument(parser)
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        parser.error("the following arguments are required: --checkpoint")
    if args.folds < 2 or args.max_frames < 1:
        raise UserError("--folds must be at least 2 and --max-frames positive.")
    return args


def check_folders(args: argparse.Namespace) -> None:
    """The input folders exist (parse_args reads no file)."""
    if not args.data_dir.is_dir():
        raise UserError(f"No folder {args.data_dir}: give --data-dir the folder of the FSDD recordings.")
    if args.frames_dir is not None and not args.frames_dir.is_dir():
        raise UserError(f"No folder {args.frames_dir}: give --frames-dir a corpus with frame labels "
                        "(`python main.py --demo` writes one to data/demo), or leave it out.")


# ----- what is probed -----------------------------------------------------------------------------

@dataclass
class Source:
    """Features probed in one pass: MFCCs, a random network or a checkpoint, with the tasks it gets."""

    spec: str  # probe.py --features: mfcc, random:CKPT or CKPT
    label: str  # row name; the layer is appended for networks
    tasks: list[str]
    train_seconds: float | None = None
    step: int | None = None
    config: Wav2VecConfig | None = None  # a checkpoint's, read once with its training time
    results: dict = field(default_factory=dict)  # layer -> task -> result

    @property
    def layers(self) -> tuple[str, ...]:
        # MFCCs have no layer; "c" is probe.py's default --layer, under which a single MFCC probe caches too.
        return ("c",) if self.spec == "mfcc" else ("z", "c")

    def row_name(self, layer: str) -> str:
        return self.label if self.spec == "mfcc" else f"{self.label} {layer}"


def checkpoint_paths(specs: Sequence[str]) -> list[Path]:
    """The checkpoint files named by --features: files as given, a run folder's checkpoint_<step>.pt and
    latest.pt."""
    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(path.glob("checkpoint_*.pt")) + [p for p in [path / "latest.pt"] if p.is_file()]
            if not found:
                raise UserError(f"{path} holds no checkpoint_<step>.pt or latest.pt: give a main.py output "
                                "folder or checkpoint files to --features.")
            paths += found
        else:
            paths.append(path)
    return paths


def checkpoint_sources(paths: Sequence[Path]) -> list[Source]:
    """One source per checkpoint, ordered by training time (those without it last, in the order given);
    the longest-trained and those without a training time get every task, the others the curve's."""
    timed = []
    for path in paths:
        ckpt = read_checkpoint(path)  # one clear sentence for a missing or unreadable file
        config, _ = checkpoint_weights(ckpt, path)  # and for a dict that is no wav2vec checkpoint
        seconds = ckpt.get("train_seconds")
        timed.append((path, None if seconds is None else float(seconds), ckpt.get("step"), config))
    timed.sort(key=lambda item: (item[1] is None, item[1] or 0.0))
    names = [path.name for path, _, _, _ in timed]
    unique = len(set(names)) == len(names)
    longest = max((seconds for _, seconds, _, _ in timed if seconds is not None), default=None)
    return [Source(str(path), path.name if unique else str(path),
                   list(TASKS) if seconds in (None, longest) else [CURVE_TASK], seconds, step, config)
            for path, seconds, step, config in timed]


def random_sources(checkpoints: Sequence[Source]) -> list[Source]:
    """A random network of each configuration among the checkpoints (the last checkpoint's first)."""
    by_config: dict[str, Source] = {}
    for source in reversed(checkpoints):
        config = json.dumps(source.config.to_dict(), sort_keys=True)
        random = Source(f"random:{source.spec}", f"random of {source.label}", list(TASKS))
        by_config.setdefault(config, random)
    sources = list(by_config.values())
    if len(sources) == 1:
        sources[0].label = "random"
    return sources


# ----- tasks, features and scores -----------------------------------------------------------------

def probe_args(args: argparse.Namespace, task: str, spec: str, layer: str) -> argparse.Namespace:
    """The single probe.py command this task is, parsed by probe.py itself."""
    data_dir = args.frames_dir if task == "frames" else args.data_dir
    return probe.parse_args(["--data-dir", str(data_dir), *TASKS[task][1], "--checkpoint", spec,
                             "--layer", layer, "--pool", POOL, "--folds", str(args.folds),
                             "--max-frames", str(args.max_frames), "--max-iter", str(args.max_iter),
                             "--seed", str(args.seed), "--cache-dir", str(args.cache_dir),
                             "--device", args.device])


def select(args: argparse.Namespace) -> dict[str, LabelledFiles]:
    """Each task's files, labels and split, as the single probe selects them."""
    names = [path.name for path in find_audio_files(args.data_dir)]
    if not any(read_labels(names, "fsdd-digit", args.data_dir)[0]):
        raise UserError(f"No FSDD-named files ({{digit}}_{{speaker}}_{{index}}.wav) under {args.data_dir}; "
                        "check --data-dir.")
    return {task: probe.select_files(probe_args(args, task, "mfcc", "c")) for task in TASKS}


def score_key(args: argparse.Namespace, source: Source, layer: str, task: str,
              selection: LabelledFiles) -> str:
    """Names a score by everything it depends on; changed inputs give a new name."""
    files = selection.paths + ([frame_label_path(p) for p in selection.paths] if task == "frames" else [])
    description = [probe.feature_source(source.spec), layer, POOL, TASKS[task][1], args.folds, args.max_iter,
                   args.max_frames if task == "frames" else None, args.seed, [probe.stamp(p) for p in files]]
    return hashlib.sha1(json.dumps(description).encode()).hexdigest()[:16]


def stacked_featurizer(spec: str, seed: int, device: torch.device) -> tuple[FramesOf, int, dict[str, slice]]:
    """(waveforms -> frames of every layer stacked on the channel axis, samples one frame covers, each
    layer's channels): one forward pass serves z and c."""
    if spec == "mfcc":
        frames_of, window = featurizer(spec, "c", seed, device)
        return frames_of, window, {"c": slice(None)}
    model = load_network(spec, seed, device)
    z = model.config.encoder_layers[-1][0]

    def frames_of(wavs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.concatenate([frames["z"], frames["c"]]) for frames in model_layers(model, wavs)]
    return frames_of, model.receptive_field, {"z": slice(0, z), "c": slice(z, None)}


def pooled_layers(args: argparse.Namespace, source: Source, paths: list[Path],
                  device: torch.device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """layer -> (X, file_index) of these files, in the cache files a single probe of that layer uses."""
    keys = {layer: probe.feature_key(probe_args(args, CURVE_TASK, source.spec, layer), paths)
            for layer in source.layers}
    cached = {layer: args.cache_dir / f"{key}.npz" for layer, key in keys.items()}
    if all(path.is_file() for path in cached.values()):
        return {layer: probe.read_pooled(path) for layer, path in cached.items()}
    frames_of, window, channels = stacked_featurizer(source.spec, args.seed, device)
    position = {path: i for i, path in enumerate(paths)}
    rows = [(position[path], {layer: pool(frames[part], POOL) for layer, part in channels.items()})
            for path, frames in file_frames(paths, frames_of, window, desc=source.label)]
    file_index = np.array([i for i, _ in rows])
    out = {}
    for layer in channels:
        X = np.stack([vectors[layer] for _, vectors in rows])
        probe.write_pooled(cached[layer], X, file_index)
        out[layer] = (X, file_index)
    return out


def frame_layers(args: argparse.Namespace, source: Source, selection: LabelledFiles,
                 device: torch.device) -> dict[str, probe.Examples]:
    """layer -> the frame-label task's examples, from one pass over the corpus."""
    frames_of, window, channels = stacked_featurizer(source.spec, args.seed, device)
    stacked = probe.frame_examples(selection.paths, frames_of, window, args.max_frames, args.seed)
    return {layer: probe.with_split(probe.Examples(stacked.X[:, part], stacked.y, stacked.file_index),
                                    selection) for layer, part in channels.items()}


def score(args: argparse.Namespace, task: str, examples: probe.Examples) -> dict:
    """probe.py's folds and logistic regression on these examples, with the seconds they took."""
    start = time.perf_counter()
    description, splits = probe.folds(examples, args.folds, args.seed, frame_level=task == "frames")
    result = probe.fit_and_score(examples.X, examples.y, splits, args.max_iter)
    result.update(n_examples=len(examples.y), n_classes=len(set(examples.y)), evaluation=description,
                  fold_names=[name for name, _, _ in splits], seconds=round(time.perf_counter() - start, 2))
    return result


def evaluate(args: argparse.Namespace, source: Source, selections: dict[str, LabelledFiles],
             device: torch.device) -> None:
    """Fill source.results, from the cache where the inputs are unchanged, computing the rest."""
    keys = {(layer, task): score_key(args, source, layer, task, selections[task])
            for layer in source.layers for task in source.tasks}
    missing = []
    for (layer, task), key in keys.items():
        path = args.cache_dir / "scores" / f"{key}.json"
        if path.is_file():
            source.results.setdefault(layer, {})[task] = {**json.loads(path.read_text()), "cached": True}
        else:
            missing.append((layer, task))
    if not missing:
        log.info("%s: every score from the cache", source.label)
        return
    examples: dict[tuple[str, str], probe.Examples] = {}
    start = time.perf_counter()
    pooled_tasks = sorted({task for _, task in missing if task != "frames"})
    for task in pooled_tasks:  # the FSDD tasks select the same files: the first computes, the cache serves
        pooled = pooled_layers(args, source, selections[task].paths, device)
        for layer, (X, file_index) in pooled.items():
            selection = selections[task]
            examples[layer, task] = probe.with_split(probe.file_examples(selection, X, file_index), selection)
    if any(task == "frames" for _, task in missing):
        for layer, frame_examples in frame_layers(args, source, selections["frames"], device).items():
            examples[layer, "frames"] = frame_examples
    log.info("%s: features in %.1f s", source.label, time.perf_counter() - start)
    for layer, task in missing:
        result = score(args, task, examples[layer, task])
        log.info("%s, %s: accuracy %.4f (%.1f s)", source.row_name(layer), TASKS[task][0], result["accuracy"],
                 result["seconds"])
        path = args.cache_dir / "scores" / f"{keys[layer, task]}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        source.results.setdefault(layer, {})[task] = {**result, "cached": False}


# ----- reporting ----------------------------------------------------------------------------------

def rows(sources: Sequence[Source]) -> list[dict]:
    """One row per source and layer: its name, features, training time and each task's result."""
    return [{"name": source.row_name(layer), "features": source.spec,
             "layer": None if source.spec == "mfcc" else layer, "train_seconds": source.train_seconds,
             "step": source.step, "tasks": source.results.get(layer, {})}
            for source in sources for layer in source.layers]


def markdown_table(table: Sequence[dict]) -> str:
    """The README's table: a row per features, accuracy per task (a dash where it was not run)."""
    lines = ["| features | " + " | ".join(heading for heading, _ in TASKS.values()) + " |",
             "|---" * (len(TASKS) + 1) + "|"]
    for row in table:
        cells = [f"{100 * row['tasks'][task]['accuracy']:.1f}%" if task in row["tasks"] else "-"
                 for task in TASKS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curve(checkpoints: Sequence[Source]) -> list[dict]:
    """(training minutes, step, z and c accuracy) of each checkpoint with a training time, in that order."""
    return [{"checkpoint": source.spec, "train_minutes": source.train_seconds / 60, "step": source.step,
             **{layer: source.results[layer][CURVE_TASK]["accuracy"] for layer in source.layers}}
            for source in checkpoints if source.train_seconds is not None]




def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_folders(args)
    if args.json:
        ensure_writable_file(args.json, "--json")  # before the work: a result must not be lost at the end
    check_writable_dir(args.output_dir)
    check_writable_dir(args.cache_dir, "--cache-dir")
    set_threads(args.threads)
    checkpoints = checkpoint_sources(checkpoint_paths(args.checkpoint))
    randoms = random_sources(checkpoints)
    for folder in (args.output_dir, args.cache_dir):  # the inputs are checked: now the outputs are made
        folder.mkdir(parents=True, exist_ok=True)
    setup_logging(progress=args.progress)
    start = time.perf_counter()
    if args.frames_dir is None:
        args.frames_dir = args.cache_dir / "demo"
        if not args.frames_dir.is_dir():
            log.info("synthesising the demo corpus into %s (once)", args.frames_dir)
            make_demo_corpus(args.frames_dir)
    selections = select(args)
    sources = [Source("mfcc", "MFCC", list(TASKS)), *randoms, *checkpoints]
    device = resolve_device(args.device)
    for number, source in enumerate(sources, 1):
        log.info("step %d of %d: %s (%s)", number, len(sources), source.label, ", ".join(source.tasks))
        evaluate(args, source, selections, device)
    table, curve = rows(sources), learning_curve(checkpoints)
    markdown = markdown_table(table)
    print(markdown)
    (args.output_dir / "table.md").write_text(markdown + "\n")
    if len(curve) >= 2:
        last = {row["name"]: row for row in rows([sources[0], randoms[0]])}
        baselines = {name: row["tasks"][CURVE_TASK]["accuracy"] for name, row in last.items()}
        draw_learning_curve(curve, baselines, args.output_dir / "learning_curve.png",
                            f"FSDD {TASKS[CURVE_TASK][0]}")
        log.info("wrote %s", args.output_dir / "learning_curve.png")
    total = round(time.perf_counter() - start, 2)
    settings = {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()}
    results = json.dumps({"suite": args.suite, "tasks": {k: v[0] for k, v in TASKS.items()}, "rows": table,
                          "learning_curve": curve, "total_seconds": total, "settings": settings}, indent=2)
    for path in [args.output_dir / "results.json"] + ([args.json] if args.json else []):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(results + "\n")
    log.info("wrote %s; %.1f s in all", args.output_dir, total)


if __name__ == "__main__":
    run_cli(main)
