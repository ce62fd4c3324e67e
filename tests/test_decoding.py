"""Beam-search decoding (decoding.py) and the n-gram LMs tools/ngram_lm.py writes: a beam finds the labelling
greedy decoding misses, an LM pulls it towards what the transcripts say, and finetune.py decodes the test
files and predict's alike, with greedy decoding's error rate beside the beam's."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scripts import TONE_LABELS, run_finetune, run_recognition, tool

import finetune
from decoding import BeamSearch
from heads import greedy_paths
from model import UserError

pytest.importorskip("flashlight.lib.text.decoder", reason="flashlight-text has no wheel for this Python")
from flashlight.lib.text.decoder.kenlm import KenLM  # noqa: E402
from flashlight.lib.text.dictionary import Dictionary  # noqa: E402

ngram_lm = tool("ngram_lm")


def log_probs(rows: list[list[float]]) -> np.ndarray:
    """Frame-by-frame probabilities (blank first) as the log-probabilities a recognizer gives."""
    return np.log(np.asarray(rows, dtype=np.float32))


def write_transcripts(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("path", "speaker", "letters"))
        writer.writerows((f"{speaker}_{i}.wav", speaker, text) for i, (speaker, text) in enumerate(rows))
    return path


def test_a_beam_finds_the_labelling_whose_alignments_together_outweigh_greedys_single_path():
    frames = log_probs([[0.6, 0.4], [0.6, 0.4]])  # blank 0.6, "a" 0.4 in both frames
    assert greedy_paths(torch.from_numpy(frames)[None], torch.tensor([2])) == [[]]  # p(blank blank) = 0.36
    assert BeamSearch(["a"], "tokens")(frames) == "a"  # p(a a) + p(a -) + p(- a) = 0.64


def test_on_confident_frames_a_beam_says_what_greedy_says_in_tokens_and_in_words():
    symbols = ["a", "b", "|"]
    best = [1, 1, 0, 2, 3, 3, 1, 0, 1]  # a, b, boundary, a, a (a blank between keeps both)
    frames = np.full((len(best), 4), 0.01, np.float32)
    frames[np.arange(len(best)), best] = 0.97
    assert BeamSearch(symbols, "tokens")(np.log(frames)) == "a b | a a"
    assert BeamSearch(symbols, "chars")(np.log(frames)) == "ab aa"


def test_ngram_lm_probabilities_of_every_context_sum_to_one_as_kenlm_reads_them(tmp_path):
    tsv = write_transcripts(tmp_path / "t.tsv", [("x", "a b c"), ("x", "a b d"), ("y", "b c a"),
                                                 ("y", "c a b d d")])
    ngram_lm.main(["--labels", str(tsv), "--label-column", "letters", "--order", "3",
                   "--output", str(tmp_path / "lm.arpa")])
    words = Dictionary(["a", "b", "c", "d", "</s>", "<unk>"])
    lm = KenLM(str(tmp_path / "lm.arpa"), words)
    for context in ([], ["a"], ["a", "b"], ["d", "a"], ["c", "c"]):
        state = lm.start(False)
        for word in context:
            state, _ = lm.score(state, words.get_index(word))
        following = [lm.score(state, i)[1] for i in range(4)] + [lm.finish(state)[1]]
        unknown = lm.score(state, words.get_index("<unk>"))[1]
        assert sum(10 ** s for s in following + [unknown]) == pytest.approx(1, abs=1e-4), context


def test_ngram_lm_leaves_the_excluded_groups_transcripts_out(tmp_path, capsys):
    tsv = write_transcripts(tmp_path / "t.tsv", [("train", "a b"), ("train", "b a"), ("test", "z z z")])
    ngram_lm.main(["--labels", str(tsv), "--label-column", "letters", "--order", "2", "--group-column",
                   "speaker", "--exclude-groups", "test", "--output", str(tmp_path / "lm.arpa")])
    unigrams = (tmp_path / "lm.arpa").read_text().split("\\1-grams:")[1].split("\\2-grams:")[0]
    words = {line.split("\t")[1] for line in unigrams.strip().splitlines()}
    assert words == {"<s>", "</s>", "<unk>", "a", "b"}
    assert "a 2-gram model of 2 transcripts" in capsys.readouterr().out
    with pytest.raises(UserError, match="None of the groups in nobody is in the column `speaker`"):
        ngram_lm.main(["--labels", str(tsv), "--label-column", "letters", "--group-column", "speaker",
                       "--exclude-groups", "nobody", "--output", str(tmp_path / "lm.arpa")])
    with pytest.raises(UserError, match="--output .* is a folder: give the path of a file"):
        ngram_lm.main(["--labels", str(tsv), "--label-column", "letters", "--output", str(tmp_path)])


def test_a_language_model_pulls_the_beam_towards_the_sequences_it_knows(tmp_path):
    tsv = write_transcripts(tmp_path / "t.tsv", [("x", "s a s a s a")] * 20)
    ngram_lm.main(["--labels", str(tsv), "--label-column", "letters", "--order", "3",
                   "--output", str(tmp_path / "lm.arpa")])
    symbols = ["a", "e", "s"]
    frames = log_probs([[0.05, 0.01, 0.01, 0.93], [0.9, 0.03, 0.03, 0.04],
                        [0.1, 0.4, 0.48, 0.02]])  # "s", then "e" a little likelier than "a"
    assert BeamSearch(symbols, "tokens")(frames) == "s e"
    assert BeamSearch(symbols, "tokens", lm=tmp_path / "lm.arpa", lm_weight=1.0)(frames) == "s a"


def test_a_run_with_an_lm_reports_greedy_beside_the_beam_and_predict_decodes_as_it_did(tmp_path, transcribed):
    arpa = tmp_path / "letters.arpa"
    ngram_lm.main(["--labels", str(transcribed / "transcripts.tsv"), "--label-column", "letters",
                   "--order", "3", "--output", str(arpa)])
    flags = ["--lr", "3e-2", "--epochs", "30", "--max-folds", "1"]
    greedy = run_recognition(tmp_path, transcribed, *flags, out="greedy")
    metrics = run_recognition(tmp_path, transcribed, *flags, "--lm", str(arpa))
    assert metrics["greedy"] == {k: greedy[k] for k in ("per", "edits", "reference_length")}  # the same model
    assert metrics["folds"]["speaker00"]["greedy"]["per"] == greedy["per"]
    with open(tmp_path / "ctc" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["errors"]) for r in rows) == metrics["edits"] != greedy["edits"]  # the beam's
    trained = {row["path"]: row["transcript"] for row in rows}
    finetune.main(["predict", "--model", str(tmp_path / "ctc" / "finetuned.pt"), "--data-dir",
                   str(transcribed), "--output", str(tmp_path / "new.csv"), "--lm", str(arpa)])
    with open(tmp_path / "new.csv", newline="") as f:
        predicted = {row["path"]: row["transcript"] for row in csv.DictReader(f)}
    assert {name: predicted[name] for name in trained} == trained


def test_decoding_flags_say_what_is_wrong_in_one_sentence(tmp_path, transcribed, tones):
    with pytest.raises(UserError, match=r"No language model at .*missing.arpa: give an ARPA"):
        BeamSearch(["a"], "tokens", lm=tmp_path / "missing.arpa")
    (tmp_path / "bad.arpa").write_text("not a language model\n")
    with pytest.raises(UserError, match=r"KenLM could not read .*bad.arpa"):
        BeamSearch(["a"], "tokens", lm=tmp_path / "bad.arpa")
    with pytest.raises(UserError, match="--beam-size and --lm decode transcripts: they go with --task ctc"):
        finetune.parse_train_args(["--checkpoint", "mfcc", "--data-dir", str(tones), "--labels", TONE_LABELS,
                                   "--beam-size", "4"])
    assert math.isfinite(run_recognition(tmp_path, transcribed, "--epochs", "1", "--max-folds", "1",
                                         "--beam-size", "4")["per"])
    run_finetune(tmp_path, tones, "--epochs", "1", "--folds", "2", "--max-folds", "1")
    with pytest.raises(UserError, match="is not a recognizer \\(--task ctc\\): --beam-size and --lm"):
        finetune.main(["predict", "--model", str(tmp_path / "run" / "finetuned.pt"), "--data-dir", str(tones),
                       "--output", str(tmp_path / "p.csv"), "--beam-size", "4"])
