"""tools/gpu_check.py on a machine without a GPU: it says so, and its table runner on stand-in steps."""

import sys

import torch
from scripts import tool

gpu_check = tool("gpu_check")


def test_without_a_gpu_it_says_so_in_one_sentence_and_exits_with_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--work-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: the GPU check needs a CUDA GPU")
    assert not list(tmp_path.iterdir())  # nothing started


def test_every_step_gets_a_row_and_one_failure_fails_the_check(monkeypatch, capsys, tmp_path):
    def wrong(work, stdout):
        raise gpu_check.CheckFailed("the loss is nan")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a stand-in GPU")
    monkeypatch.setattr(gpu_check, "steps", lambda: [
        gpu_check.Step("fine", [sys.executable, "-c", "print(42)"], 30, lambda work, stdout: stdout.strip()),
        gpu_check.Step("crashed", [sys.executable, "-c", "raise SystemExit('error: it broke.')"], 30,
                       lambda work, stdout: ""),
        gpu_check.Step("wrong", [sys.executable, "-c", "pass"], 30, wrong),
        gpu_check.Step("hung", [sys.executable, "-c", "import time; time.sleep(60)"], 1,
                       lambda work, stdout: ""),
    ])
    assert gpu_check.main(["--work-dir", str(tmp_path)]) == 1
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split()[:2] for row in rows] == [["fine", "ok"], ["crashed", "FAIL"], ["wrong", "FAIL"],
                                                 ["hung", "FAIL"]]
    assert rows[0].endswith(" 42") and rows[1].endswith("exit code 1: error: it broke.")
    assert rows[2].endswith("CheckFailed: the loss is nan") and rows[3].endswith("still running after 1 s")
    assert (tmp_path / "crashed.log").read_text().endswith("\nerror: it broke.\n")  # its whole output
    monkeypatch.setattr(gpu_check, "steps", lambda: [])
    assert gpu_check.main(["--work-dir", str(tmp_path)]) == 0


def test_every_step_runs_on_the_gpu():
    for step in gpu_check.steps():
        device = step.command[step.command.index("--device") + 1] if "--device" in step.command else None
        assert device == "cuda" or ".cuda()" in step.command[-1], step.name
