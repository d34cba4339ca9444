"""The pipelines' one stage helper (minidiffit/tools/stages.py) and the reproduce.sh that dispatches to them.
The pipelines end to end run in tests/test_repo.py (reproduce.sh fashion and imagenet256 in FAST mode)."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from minidiffit.__main__ import COMMANDS
from minidiffit.tools import pipelines
from minidiffit.tools.stages import caller_args, stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def writer(tmp_path):
    """A command that appends a line to a log (to count its runs) and writes its output file; an input file."""
    script = tmp_path / "make.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('ran\\n')\nopen(sys.argv[2], 'w').write('out')\n")
    (tmp_path / "input.txt").write_text("in")
    return tmp_path


def _stage(d, **kw):
    return stage("make the output", [str(d / "make.py"), str(d / "log"), str(d / "out.txt")],
                 inputs=[d / "input.txt"], outputs=[d / "out.txt"], **kw)


def _age(path, seconds):  # mtime moved into the past, so that "newer" does not hang on the clock's resolution
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_stage_runs_then_skips_when_outputs_are_newer_then_reruns_when_an_input_is_newer(writer, capfd):
    d = writer
    assert _stage(d) is True
    printed = capfd.readouterr().out
    assert "== make the output\n" in printed
    assert f"  python {shlex.quote(str(d / 'make.py'))} " in printed  # the command, printed before it ran
    assert (d / "log").read_text() == "ran\n"

    _age(d / "input.txt", 10)
    assert _stage(d) is False  # the output is newer than the input: done
    assert "make the output: up to date" in capfd.readouterr().out
    assert (d / "log").read_text() == "ran\n"

    _age(d / "out.txt", 20)  # now the input is newer: made again
    assert _stage(d) is True
    assert (d / "log").read_text() == "ran\nran\n"

    (d / "out.txt").unlink()  # a missing output: made again
    _age(d / "input.txt", 30)
    assert _stage(d) is True and (d / "log").read_text().count("ran") == 3


def test_stage_without_outputs_always_runs_and_a_stamp_makes_it_skippable(writer, capfd):
    d = writer
    command = [str(d / "make.py"), str(d / "log"), str(d / "out.txt")]
    assert stage("train", command) and stage("train", command)  # training, prepare: the command knows it is done
    assert (d / "log").read_text() == "ran\nran\n"
    _age(d / "input.txt", 10)
    assert stage("score", command, inputs=[d / "input.txt"], stamp=d / "fid" / ".scored") is True
    assert (d / "fid" / ".scored").is_file()  # touched after the command succeeded
    assert stage("score", command, inputs=[d / "input.txt"], stamp=d / "fid" / ".scored") is False
    assert (d / "log").read_text().count("ran") == 3


def test_stage_prints_the_package_command_env_and_torchrun_without_running_in_print_mode(capfd):
    assert stage("sample", ["sample", "--tag=a b"], env={"MINIDIFFIT_VAE": "tiny"}, gpus="N", run=False) is False
    assert capfd.readouterr().out == (
        "== sample\n  MINIDIFFIT_VAE=tiny torchrun --standalone --nproc_per_node=N -m minidiffit sample '--tag=a b'\n")
    assert stage("fid", ["fid", "--help"], run=False) is False
    assert "  python -m minidiffit fid --help\n" in capfd.readouterr().out


def test_a_failing_stage_ends_the_pipeline_with_its_exit_code(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit(3)\n")
    with pytest.raises(SystemExit) as e:
        stage("fail", [str(script)], outputs=[tmp_path / "never"])
    assert e.value.code == 3


def test_paths_the_user_typed_are_relative_to_their_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFFIT_CALLER_PWD", str(tmp_path))
    args = caller_args(["--data_dir=data", "--ref=/abs/ref.npz", "--weights=w.safetensors", "--ckpt=c.pt",
                        "--out=runs/x", "--iters=3"])
    assert args == [f"--data_dir={tmp_path}/data", "--ref=/abs/ref.npz", f"--weights={tmp_path}/w.safetensors",
                    f"--ckpt={tmp_path}/c.pt", "--out=runs/x", "--iters=3"]  # --out stays relative to the repository


def test_settings_are_checked_in_process_before_any_stage(capfd, monkeypatch):
    monkeypatch.chdir(ROOT)  # main() moves to the repository; monkeypatch moves back afterwards
    with pytest.raises(SystemExit) as e:
        pipelines.main(["imagenet256", "--bogus=1"])
    err = capfd.readouterr()
    assert e.value.code == 2 and "unknown config key 'bogus'" in err.err and "==" not in err.out


def test_reproduce_sh_is_a_short_dispatcher():
    lines = (ROOT / "reproduce.sh").read_text().splitlines()
    assert len(lines) <= 80, f"reproduce.sh has {len(lines)} lines: pipelines belong in minidiffit/tools/pipelines.py"
    help_text = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "help"], capture_output=True, text=True).stdout
    for name in pipelines.PIPELINES:  # every pipeline is listed in help and dispatched to python -m minidiffit
        assert f"\n  {name} " in help_text
    assert '"$PY" -m minidiffit "$cmd"' in "\n".join(lines)
    assert set(pipelines.PIPELINES) <= set(COMMANDS)


def test_the_tier_summary_reads_the_last_line_of_each_model(tmp_path):
    lines = ["2026-11-30 10:13 UTC  FID 36.5944  samples 500 (x)  ref y  network n  fashion floor: train vs test, N=500",
             "2026-11-30 10:14 UTC  FID 102.4068  KID 0.07000 +- 0.00500  samples 500 (x)  ref y  network n  "
             "fashion image-space DiffiT, runs/fashion/edm, Heun 18 steps (35 NFE), N=500",
             "2026-11-30 11:49 UTC  FID 107.0941  KID 0.08000 +- 0.00600  samples 500 (x)  ref y  network n  "
             "fashion image-space DiffiT, runs/fashion/edm, Heun 18 steps (35 NFE), N=500"]
    (tmp_path / "r.txt").write_text("\n".join(lines) + "\n")
    summary = pipelines.fashion_summary(tmp_path / "r.txt", {"latent": tmp_path / "absent"})
    assert summary == {"floor": {"fid": 36.5944}, "image": {"fid": 107.0941, "kid": 0.08, "kid_std": 0.006}}


def test_the_committed_tier_summary_is_the_results_file_s():
    import json

    committed = json.loads((ROOT / "results" / "fashion.json").read_text())
    for key, scores in pipelines.fashion_summary(ROOT / "results" / "fashion.txt").items():
        assert {k: committed[key][k] for k in scores} == scores, key
