"""Shared helpers for the entry scripts: the CLI error edge, logging, devices and labels."""

from __future__ import annotations

import csv
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from model import UserError

log = logging.getLogger(__name__)


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit code 2, never a trace."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log to stderr and, when given, to a plain-text file as well."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", handlers=handlers, force=True)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; an unavailable explicit device is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available; use --device cpu.")
    return device


# ----- labels -------------------------------------------------------------------------------------
# A label source is one of:
#   a path to a TSV with a header holding `path` (relative to the data folder) and `label` columns,
#   "folder"   : the name of each file's parent folder,
#   "pattern:REGEX" : a regular expression on the file name with a named group `label`, e.g. FSDD's
#                     "pattern:(?P<label>\d+)_(?P<speaker>[a-z]+)_\d+\.wav".

FSDD_PATTERN = r"(?P<digit>\d+)_(?P<speaker>[a-z]+)_(?P<index>\d+)\.wav"


def read_label_table(tsv: Path, column: str = "label") -> dict[str, str]:
    """{relative path: value of `column`} from a TSV with a header that has `path` and `column`."""
    if not tsv.is_file():
        raise UserError(f"No label file at {tsv}: give a TSV with `path` and `{column}` columns.")
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "path" not in rows[0] or column not in rows[0]:
        raise UserError(f"{tsv} needs a header with `path` and `{column}` columns (tab-separated).")
    return {row["path"]: row[column] for row in rows}


def labels_for_files(files: Sequence[str], source: str, data_dir: Path,
                     column: str = "label") -> list[str | None]:
    """One label per relative file path (None where the source has none), from a TSV, folder or pattern."""
    if source == "folder":
        return [Path(f).parent.name or None for f in files]
    if source.startswith("pattern:"):
        regex = re.compile(source[len("pattern:"):])
        if column not in regex.groupindex:
            raise UserError(f"The label pattern needs a named group (?P<{column}>...).")
        matches = [regex.fullmatch(Path(f).name) for f in files]
        return [m.group(column) if m else None for m in matches]
    tsv = Path(source)
    if not tsv.is_file() and (data_dir / source).is_file():
        tsv = data_dir / source  # a TSV named relative to the data folder
    table = read_label_table(tsv, column)
    return [table.get(f) for f in files]
