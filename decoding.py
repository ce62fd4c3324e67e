"""CTC beam search for a recognizer's log-probabilities, with an optional n-gram language model.

Greedy decoding (heads.greedy_paths) takes the best symbol of every frame. A beam search keeps the
`beam_size` best prefixes, each scored over all of its alignments; with a language model it adds
`lm_weight` x the model's log10-probability of each symbol and `insertion_bonus` per symbol (the bonus
counters the lean of the LM, and of CTC, towards deletions). The search is flashlight-text's (wav2letter's
decoder, with KenLM inside: it installs as a wheel).

The LM is an n-gram over the recognizer's own symbols: phones with `tokens` units, characters and the
word boundary `|` with `chars` (tools/ngram_lm.py writes one from transcripts; any ARPA or KenLM binary
file over those symbols will do). flashlight's lexicon decoder scores words, so each symbol is a word of
one symbol; it needs a silence token, which a CTC recognizer has not: an extra output column that is never
likely stands in for it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from labels import detokenize
from utils import UserError, non_negative_float, non_negative_int

BEAM_SIZE = 20  # with --lm and no --beam-size
LM_WEIGHT, INSERTION_BONUS = 0.5, 1.0  # a small grid's best on speechocean762 phones (docs/RESULTS.md)
BEAM_THRESHOLD = 25.0  # hypotheses this far (log-probability) below the best are dropped
NEVER = -1e4  # the log-probability of the stand-in silence column


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding (--task ctc)")
    group.add_argument("--beam-size", type=non_negative_int, default=0,
                       help="prefixes a CTC beam search keeps; 0: greedy decoding, unless --lm is given "
                            f"(then {BEAM_SIZE})")
    group.add_argument("--lm", type=Path,
                       help="an n-gram model of the recognizer's symbols (phones; characters and |) for the "
                            "beam search: ARPA or KenLM binary, as tools/ngram_lm.py writes")
    group.add_argument("--lm-weight", type=non_negative_float, default=LM_WEIGHT,
                       help="weight of the LM's log10-probability against the acoustic log-probability")
    group.add_argument("--insertion-bonus", type=float, default=INSERTION_BONUS,
                       help="added to a hypothesis's score per symbol, with --lm")


def beam_wanted(args: argparse.Namespace) -> bool:
    """Whether the flags ask for a beam search rather than greedy decoding."""
    return bool(args.beam_size or args.lm)


def beam_settings(args: argparse.Namespace) -> dict:
    """Recognizer.beam_search's arguments from --beam-size, --lm, --lm-weight and --insertion-bonus."""
    return {"beam_size": args.beam_size or BEAM_SIZE, "lm": args.lm, "lm_weight": args.lm_weight,
            "insertion_bonus": args.insertion_bonus}


class BeamSearch:
    """`BeamSearch(symbols, units, ...)(log_probs)`: the transcript (as detokenize writes it) of one
    utterance's (T, symbols + 1) log-probabilities, the blank first."""

    def __init__(self, symbols: Sequence[str], units: str, beam_size: int = BEAM_SIZE,
                 lm: str | Path | None = None, lm_weight: float = LM_WEIGHT,
                 insertion_bonus: float = INSERTION_BONUS):
        try:
            from flashlight.lib.text import decoder as fl
            from flashlight.lib.text.dictionary import Dictionary
        except ImportError:
            raise UserError("Beam search needs flashlight-text: pip install flashlight-text (or decode "
                            "greedily: drop --beam-size and --lm).") from None
        self.symbols, self.units = tuple(symbols), units
        silence = len(self.symbols) + 1  # the stand-in column after the blank and the symbols
        if lm is None:
            options = fl.LexiconFreeDecoderOptions(beam_size, silence, BEAM_THRESHOLD, 0.0, 0.0, True,
                                                   fl.CriterionType.CTC)
            self.decoder = fl.LexiconFreeDecoder(options, fl.ZeroLM(), silence, 0, [])
            self.lexicon = False
            return
        words = Dictionary([*self.symbols, "<unk>"])
        language_model = load_lm(Path(lm), words)
        trie = fl.Trie(silence + 1, silence)
        start = language_model.start(False)
        for i, _ in enumerate(self.symbols):  # symbol i is the word i, spelled by output id i + 1
            trie.insert([i + 1], i, language_model.score(start, i)[1])
        trie.smear(fl.SmearingMode.MAX)
        options = fl.LexiconDecoderOptions(beam_size, silence, BEAM_THRESHOLD, lm_weight, insertion_bonus,
                                           float("-inf"), 0.0, True, fl.CriterionType.CTC)
        self.decoder = fl.LexiconDecoder(options, trie, language_model, silence, 0, words.get_index("<unk>"),
                                         [], False)
        self.lexicon = True

    def __call__(self, log_probs: np.ndarray) -> str:
        emissions = np.ascontiguousarray(np.concatenate(
            [np.asarray(log_probs, dtype=np.float32), np.full((len(log_probs), 1), NEVER, np.float32)], 1))
        best = self.decoder.decode(emissions.ctypes.data, *emissions.shape)[0]
        if self.lexicon:
            ids = [w for w in best.words if 0 <= w < len(self.symbols)]
        else:  # a frame-by-frame path: merge repeats, drop blanks
            path = [t for k, t in enumerate(best.tokens) if k == 0 or t != best.tokens[k - 1]]
            ids = [t - 1 for t in path if 1 <= t <= len(self.symbols)]
        return detokenize([self.symbols[i] for i in ids], self.units)


def load_lm(path: Path, words):
    """flashlight's KenLM of the file at `path` over the dictionary `words`, or a UserError saying why not."""
    from flashlight.lib.text.decoder.kenlm import KenLM
    if not path.is_file():
        raise UserError(f"No language model at {path}: give an ARPA or KenLM binary file (tools/ngram_lm.py "
                        "writes one).")
    try:
        with quiet_stderr():  # KenLM draws a progress bar of its own while it reads an ARPA file
            return KenLM(str(path), words)
    except Exception as error:  # KenLM's own exceptions are not exported to Python
        raise UserError(f"KenLM could not read {path} ({error}): give an ARPA or KenLM binary "
                        "file.") from None


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send what C++ code writes to file descriptor 2 to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
