"""An n-gram language model of transcripts, as an ARPA file, for finetune.py's beam search (--lm).

    python tools/ngram_lm.py --labels ../shared/data/speechocean762/metadata.tsv --label-column phones \
        --units tokens --order 5 --group-column speaker \
        --exclude-groups docs/speechocean762_test_speakers.txt --output runs/phones_5.arpa

The symbols are the recognizer's: tokens (phones) for --units tokens, characters and the word boundary `|`
for chars (labels.tokenize), so the LM scores exactly what the recognizer emits. Leave the test speakers
out (--exclude-groups) or their transcripts leak into the test.

The estimate is interpolated Kneser-Ney with one discount per order (Chen and Goodman), written in ARPA's
backoff form: a seen n-gram stores its interpolated probability and a context its interpolation weight as
the backoff weight, as SRILM writes interpolated models. (KenLM's `lmplz` makes the same kind of model; it
is a C++ program that pip does not install, and transcripts of a few thousand utterances need no more.)
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from labels import UNITS, read_group_list, read_label_table, tokenize  # noqa: E402 (after the path)
from utils import HelpFormatter, UserError, ensure_writable_file, run_cli  # noqa: E402

START, END, UNKNOWN = "<s>", "</s>", "<unk>"


def ngram_counts(sentences: Sequence[Sequence[str]], order: int) -> list[Counter]:
    """Kneser-Ney counts per order (index n: n-grams as tuples): raw counts at the top order; below it the
    number of distinct words seen before the n-gram, except for n-grams that begin a sentence."""
    padded = [(START, *s, END) for s in sentences]
    raw = [Counter() for _ in range(order + 1)]
    for s in padded:
        for n in range(1, order + 1):
            raw[n].update(tuple(s[i:i + n]) for i in range(len(s) - n + 1))
    counts = [Counter() for _ in range(order + 1)]
    counts[order] = raw[order]
    for n in range(order, 1, -1):
        for gram in raw[n]:
            counts[n - 1][gram[1:]] += 1
    for n in range(1, order):
        counts[n].update({g: c for g, c in raw[n].items() if g[0] == START})  # no word comes before <s>
    counts[1].pop((START,), None)  # the sentence start is given, never predicted
    return counts


def discount(counts: Counter) -> float:
    """Absolute discount D = n1 / (n1 + 2 n2) of the n-grams seen once (n1) and twice (n2), kept in [0.1, 0.9]
    for tiny corpora."""
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    return min(max(n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5, 0.1), 0.9)


def kneser_ney(sentences: Sequence[Sequence[str]], order: int) -> tuple[dict, dict]:
    """(probability of each seen n-gram, backoff weight of each context) of interpolated Kneser-Ney; the
    unigrams interpolate with a uniform distribution over the words and <unk>."""
    counts = ngram_counts(sentences, order)
    words = len(counts[1]) + 1
    probability, backoff = {}, {}
    for n in range(1, order + 1):
        d = discount(counts[n])
        total, types = defaultdict(int), defaultdict(int)
        for gram, c in counts[n].items():
            total[gram[:-1]] += c
            types[gram[:-1]] += 1
        for gram, c in counts[n].items():
            context = gram[:-1]
            lower = probability[gram[1:]] if n > 1 else 1 / words
            probability[gram] = (max(c - d, 0) + d * types[context] * lower) / total[context]
        if n == 1:
            probability[(UNKNOWN,)] = d * types[()] / total[()] / words
        else:
            backoff.update({context: d * types[context] / total[context] for context in total})
    return probability, backoff


def write_arpa(probability: dict, backoff: dict, order: int, path: Path) -> dict[int, int]:
    """The model in ARPA format (log10); returns the number of n-grams per order."""
    grams = {n: sorted(g for g in probability if len(g) == n) for n in range(1, order + 1)}
    grams[1] = sorted([*grams[1], (START,)])
    lines = ["\\data\\", *(f"ngram {n}={len(grams[n])}" for n in grams)]
    for n in grams:
        lines += ["", f"\\{n}-grams:"]
        for gram in grams[n]:
            logp = -99.0 if gram == (START,) else math.log10(probability[gram])
            line = f"{logp:.6f}\t{' '.join(gram)}"
            if n < order and gram in backoff:
                line += f"\t{math.log10(backoff[gram]):.6f}"
            lines.append(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, "", "\\end\\", ""]))
    return {n: len(g) for n, g in grams.items()}


def transcripts(args: argparse.Namespace) -> list[list[str]]:
    """The label column's transcripts as symbols, without the excluded groups' rows and empty ones."""
    texts = read_label_table(args.labels, args.label_column)
    if args.exclude_groups:
        groups = read_label_table(args.labels, args.group_column)
        excluded = set(read_group_list(args.exclude_groups))
        if not excluded & set(groups.values()):
            raise UserError(f"None of the groups in {args.exclude_groups} is in the column "
                            f"`{args.group_column}` of {args.labels}: check the names.")
        texts = {path: text for path, text in texts.items() if groups[path] not in excluded}
    sentences = [tokenize(text, args.units) for text in texts.values()]
    return [s for s in sentences if s]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--labels", type=Path, required=True, help="a TSV with a header, as finetune.py's")
    parser.add_argument("--label-column", default="label", help="the column of the transcripts")
    parser.add_argument("--units", choices=UNITS, default="tokens",
                        help="the recognizer's units: tokens (space-separated symbols) or chars")
    parser.add_argument("--order", type=int, default=5, help="n of the n-grams")
    parser.add_argument("--group-column", help="the column --exclude-groups names groups of")
    parser.add_argument("--exclude-groups", metavar="FILE_OR_LIST",
                        help="groups whose transcripts stay out (the test speakers): a file of names or a "
                             "comma-separated list")
    parser.add_argument("--output", type=Path, required=True, help="the ARPA file to write")
    args = parser.parse_args(argv)
    if args.order < 1:
        raise UserError(f"--order must be at least 1, not {args.order}.")
    if args.exclude_groups and not args.group_column:
        raise UserError("--exclude-groups needs --group-column (the TSV column the groups are named in).")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ensure_writable_file(args.output, "--output")
    sentences = transcripts(args)
    if not sentences:
        raise UserError(f"No transcripts in the column `{args.label_column}` of {args.labels}.")
    sizes = write_arpa(*kneser_ney(sentences, args.order), args.order, args.output)
    print(f"wrote {args.output}: a {args.order}-gram model of {len(sentences)} transcripts "
          f"({', '.join(f'{count} {n}-grams' for n, count in sizes.items())})")


if __name__ == "__main__":
    run_cli(main)
