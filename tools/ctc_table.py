"""The speech-recognition table of issue #24 on speechocean762: every row one finetune.py --task ctc run.

    python tools/ctc_table.py --data-dir ../shared/data/speechocean762 \
        --checkpoint ../shared/checkpoints/so762_small_hour.pt --output-dir runs/ctc_table [--rows NAME ...]

Test speakers: the 20 of docs/speechocean762_test_speakers.txt (see test_speakers for the rule); validation
speakers for early stopping: --valid-fraction 0.1 of the other 80 (8 speakers). Each row writes
OUTPUT/NAME/ (metrics.json, predictions.csv, posteriorgram.png, finetuned.pt) and keeps the frozen frames
of each backbone and layer in OUTPUT/cache/ for the other rows; a row whose metrics.json exists is not run
again, so an interrupted table continues where it stopped. OUTPUT/table.md collects them,
with the load average each row ran under. Rows run one at a time, on one thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from labels import read_group_list  # noqa: E402 (after the path)

TEST_SPEAKERS = REPO / "docs" / "speechocean762_test_speakers.txt"

LINEAR = ["--head", "linear", "--lr", "2e-2", "--epochs", "40", "--dropout", "0"]
# bf16: 1.5x faster LSTMs on a CPU with AMX (same PER as fp32 on the demo words); 128 units: 2.2x faster than
# 192 at 1 to 2 points of PER in the prototype's MFCC runs. A CPU without bf16 instructions: --precision fp32.
BILSTM = ["--head", "bilstm", "--hidden", "128", "--layers", "2", "--dropout", "0.2", "--subsample", "2",
          "--lr", "2e-3", "--epochs", "15", "--precision", "bf16"]
FINETUNE = ["--freeze", "encoder", "--backbone-lr", "1e-4", "--freeze-updates", "100"]


def rows(checkpoint: str) -> dict[str, list[str]]:
    """Row name -> the flags that make it (besides data, labels and split)."""
    random = f"random:{checkpoint}"
    table = {"mfcc linear": ["--checkpoint", "mfcc", *LINEAR]}
    for name, spec in (("random", random), ("pre-trained", checkpoint)):
        for layer in ("z", "c", "all"):
            table[f"{name} {layer} linear"] = ["--checkpoint", spec, "--layer", layer, *LINEAR]
    table["mfcc bilstm"] = ["--checkpoint", "mfcc", *BILSTM]
    for name, spec in (("random", random), ("pre-trained", checkpoint)):
        for layer in ("z", "c", "all"):
            table[f"{name} {layer} bilstm"] = ["--checkpoint", spec, "--layer", layer, *BILSTM]
    for name, spec in (("random", random), ("pre-trained", checkpoint)):
        table[f"{name} c bilstm fine-tuned"] = ["--checkpoint", spec, "--layer", "c", *BILSTM, *FINETUNE]
    for row in ("mfcc bilstm", "pre-trained c bilstm"):
        table[f"{row} chars"] = [*table[row], "--units", "chars", "--label-column", "text"]
    return table


def test_speakers(metadata: Path) -> list[str]:
    """The rule behind docs/speechocean762_test_speakers.txt: the 100 speakers sorted by (gender, age, id),
    every 5th from the 3rd (positions 2, 7, ..., 97): 20 speakers, balanced in gender and age by design."""
    with open(metadata, newline="") as f:
        info = {row["speaker"]: (row["gender"], int(row["age"]), row["speaker"])
                for row in csv.DictReader(f, delimiter="\t")}
    return sorted(sorted(info, key=info.get)[2::5])


def run_row(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    out = args.output_dir / name.replace(" ", "_")
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    units = [] if "--units" in flags else ["--units", "tokens", "--label-column", "phones"]
    command = [sys.executable, str(REPO / "finetune.py"), "--task", "ctc", "--data-dir", str(args.data_dir),
               "--labels", str(args.data_dir / "metadata.tsv"), "--group-column", "speaker",
               "--test-groups", str(TEST_SPEAKERS), "--valid-fraction", "0.1", "--batch-size", "16",
               "--threads", "1", "--output-dir", str(out), "--cache-dir", str(args.output_dir / "cache"),
               *units, *flags]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    load = os.getloadavg()[0]
    start = time.time()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["table"] = {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                        "wall_seconds": round(time.time() - start)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def table_line(name: str, m: dict) -> str:
    fold = next(iter(m["folds"].values()))
    valid = fold.get("valid", {})
    rate = (f"PER {m['per']:.1f}" if "per" in m else f"CER {m['cer']:.1f} / WER {m['wer']:.1f}")
    valid_rate = valid.get("per", valid.get("cer", float("nan")))
    load = m.get("table", {})
    return (f"| {name} | {rate} | {valid_rate:.1f} | {fold['best_update']} / {fold['updates']} | "
            f"{fold['train_seconds']:.0f} | {load.get('load_before', '')}-{load.get('load_after', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="speechocean762 (audio/, metadata.tsv)")
    parser.add_argument("--checkpoint", required=True, help="the pre-trained checkpoint")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/ctc_table"))
    parser.add_argument("--rows", nargs="*", help="run only these rows (names as in the table)")
    parser.add_argument("--table-only", action="store_true",
                        help="write table.md from the rows that have finished, and run none")
    parser.add_argument("--check-split", action="store_true",
                        help="check that the test speaker list follows its rule, and stop")
    args = parser.parse_args()
    listed = read_group_list(str(TEST_SPEAKERS))
    if listed != test_speakers(args.data_dir / "metadata.tsv"):
        sys.exit(f"{TEST_SPEAKERS} does not follow its rule on this metadata.tsv")
    if args.check_split:
        print("test speakers:", " ".join(listed))
        return
    chosen = rows(args.checkpoint)
    unknown = set(args.rows or ()) - set(chosen)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; the rows are: {', '.join(chosen)}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    lines = ["| row | test | valid | best / last update | train s | load |", "|---|---|---|---|---|---|"]
    for name, flags in chosen.items():
        finished = (args.output_dir / name.replace(" ", "_") / "metrics.json").is_file()
        if (args.rows and name not in args.rows) or (args.table_only and not finished):
            continue
        lines.append(table_line(name, run_row(name, flags, args)))
        (args.output_dir / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
