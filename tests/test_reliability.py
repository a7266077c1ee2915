"""Bad input and honest defaults of the ``pda`` command (issue 15); docs/reliability.md is the
index of these tests."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from test_uea import toy_dataset, write_ts

from primal_dual_attention.cli import build_parser, main, resolve_config
from primal_dual_attention.training import engine
from primal_dual_attention.training.config import TrainConfig, load_yaml_config
from primal_dual_attention.training.engine import fit, load_checkpoint, seed_everything
from primal_dual_attention.training.tasks import build_task

README = Path(__file__).parents[1] / "README.md"


def test_clean_is_the_default_protocol_of_train_and_demo():
    assert resolve_config(build_parser().parse_args(["train"])).protocol == "clean"
    assert resolve_config(build_parser().parse_args(["train", "--protocol", "paper"])).protocol == "paper"
    demo = build_parser().parse_args(["demo"])
    assert demo.protocol == "clean"
    assert "default protocol is `clean`" in README.read_text()
    from primal_dual_attention.cli import protocol_note

    assert protocol_note("clean", range(54)).startswith("54 held-out validation samples choose the epoch")
    assert protocol_note("clean", None).startswith("no validation split: the last epoch is kept")
    assert protocol_note("clean", range(2606), 256).startswith(
        "256 of the 2606 held-out validation samples (max_eval_samples) choose the epoch")


def _one_epoch(tmp_path: Path, **options) -> TrainConfig:
    """A tiny JapaneseVowels run (one epoch unless ``options`` say otherwise)."""
    values = dict(dim=8, depth=1, heads=2, mlp_dim=8, epochs=1, batch_size=64, out_dir=str(tmp_path),
                  threads=1)
    cfg = replace(TrainConfig(), **(values | options)).validate()
    seed_everything(0)
    fit(cfg, build_task(cfg))
    return cfg


def test_progress_bars_only_on_a_terminal_unless_forced(tmp_path, capsys):
    """Issue 15 item 6: a log file gets no bars (pytest's stderr is not a terminal)."""
    assert build_parser().parse_args(["train"]).__dict__.get("progress") is None
    assert resolve_config(build_parser().parse_args(["train"])).progress is None
    _one_epoch(tmp_path / "auto")
    assert "epoch 1/1" not in capsys.readouterr().err
    _one_epoch(tmp_path / "forced", progress=True)
    assert "epoch 1/1" in capsys.readouterr().err
    assert resolve_config(build_parser().parse_args(["train", "--progress"])).progress is True
    assert build_parser().parse_args(["demo", "--progress"]).progress is True


def one_line_error(capsys, argv: list[str]) -> str:
    """``pda argv`` fails with exit status 2 and one line on stderr, which is returned."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pda: error: ") and err.count("\n") == 1, err
    return err


def test_eval_on_data_of_another_shape_is_one_line(tmp_path, capsys):
    """Issue 15 item 4: a swapped data folder, not a 15-line size-mismatch traceback."""
    cfg = _one_epoch(tmp_path / "runs", dataset="Toy", data_dir=str(toy_dataset(tmp_path / "a")),
                     batch_size=2)
    other = tmp_path / "b" / "Toy"
    other.mkdir(parents=True)
    for split in ("TRAIN", "TEST"):
        write_ts(other / f"Toy_{split}.ts", ["1,2,3,4:4,5,6,7:a", "2,3,4,5:5,6,7,8:b"] * 2, equal=False)
    err = one_line_error(capsys, ["eval", str(cfg.run_dir() / "best.pt"), "--data-dir", str(other.parent)])
    assert "pos_embed" in err and "(1, 3, 8)" in err and "(1, 4, 8)" in err and "data" in err


def test_yaml_numbers_in_exponent_form_are_floats(tmp_path):
    """Issue 15 item 7: PyYAML reads ``1e-3`` (no dot) as a string; it is a float here."""
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-2\ndropout: .1\n")
    cfg = load_yaml_config(path)
    assert (cfg.lr, cfg.weight_decay, cfg.dropout) == (1e-3, 5e-2, 0.1)
    assert resolve_config(build_parser().parse_args(["train", "--config", str(path)])).lr == 1e-3
    for bad in ("lr: fast\n", "lr: nan\n", "epochs: 1e3\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="must be of type"):
            load_yaml_config(path)


def test_unknown_dataset_says_where_it_looked(capsys):
    err = one_line_error(capsys, ["train", "--dataset", "JapaneseVowel", "--epochs", "1"])
    assert "JapaneseVowel" in err and "looked in" in err and "aeon" in err
    assert "tsc_zenodo" not in err and "JapaneseVowels" in err  # a close name is suggested


def test_head_scales_longer_than_the_sequence_warn_once(tmp_path):
    """JapaneseVowels' training series have at most 26 steps: a scale of 64 pools them into one key."""
    cfg = replace(TrainConfig(), variant="sh", dim=8, heads=2, head_scales=[1, 64],
                  out_dir=str(tmp_path)).validate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_task(cfg)
    assert [str(w.message) for w in caught if "head_scales" in str(w.message)] == [
        "head_scales [64] exceed the sequence length 26: such a head pools every key into one"]


def test_random_bytes_checkpoint_error_gives_no_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "best.pt"
    path.write_bytes(bytes(range(256)) * 40)
    err = one_line_error(capsys, ["eval", str(path)])
    assert "best.pt is not a readable" in err and "weights_only" not in err


def test_resume_says_where_it_continues(tmp_path, monkeypatch, capsys):
    original, calls = engine._train_epoch, []

    def crash_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        _one_epoch(tmp_path, epochs=3)
    monkeypatch.setattr(engine, "_train_epoch", original)
    capsys.readouterr()
    cfg = _one_epoch(tmp_path, epochs=3, resume=True)
    assert f"resuming {cfg.run_dir()} at epoch 2/3 (last.pt holds epoch 1)" in capsys.readouterr().out
    assert load_checkpoint(cfg.run_dir() / "last.pt")["epoch"] == 2


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_run_folder_is_never_overwritten(tmp_path, capsys):
    """Issue 15 item 2: the same options continue (--resume) or refuse; other options get their
    own folder, or replace the run with an explicit --overwrite; the message says which."""
    first = _one_epoch(tmp_path)
    folder = first.run_dir()
    kept = _files(folder)
    capsys.readouterr()
    other = _one_epoch(tmp_path, epochs=2)  # another budget: its own folder
    assert f"{folder} holds a run with other options (epochs: 1 -> 2); this run goes to {folder}-2" \
        in capsys.readouterr().out
    assert _files(folder) == kept and (Path(f"{folder}-2") / "best.pt").is_file()
    with pytest.raises(ValueError, match=r"seed0 already holds this run \(finished, 1/1 epochs\); "
                                         r"pass --resume to continue it or --overwrite to start it again"):
        _one_epoch(tmp_path)
    _one_epoch(tmp_path, resume=True)
    assert f"resuming {folder} with all 1 epochs done" in capsys.readouterr().out
    _one_epoch(tmp_path, epochs=2, resume=True)  # finds its own folder again
    assert f"resuming {folder}-2 with all 2 epochs done" in capsys.readouterr().out
    assert _files(folder) == kept
    (folder / "tensorboard").mkdir()  # the old run's events (TensorBoard, when installed)
    (folder / "tensorboard" / "events.out").write_text("old")
    _one_epoch(tmp_path, lr=0.01, overwrite=True)
    assert not (folder / "tensorboard" / "events.out").exists()
    assert f"overwriting {folder} (a run with other options: lr: 0.001 -> 0.01)" in capsys.readouterr().out
    assert load_checkpoint(folder / "last.pt")["config"]["lr"] == 0.01
    assert load_checkpoint(Path(f"{folder}-2") / "last.pt")["config"]["epochs"] == other.epochs
    err = one_line_error(capsys, ["train", "--dim", "8", "--depth", "1", "--heads", "2", "--mlp-dim", "8",
                                  "--epochs", "1", "--batch-size", "64", "--threads", "1", "--lr", "0.01",
                                  "--out-dir", str(tmp_path)])
    assert "already holds this run" in err
    assert one_line_error(capsys, ["train", "--resume", "--overwrite"]).endswith(
        "resume and overwrite exclude each other: --resume continues a run, --overwrite starts it again\n")


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\n  lr: 2\n")
    err = one_line_error(capsys, ["train", "--config", str(path)])
    assert f"{path}:2:5: not valid YAML (mapping values are not allowed here)" in err


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "best"], "protocol must be one of ['paper', 'clean'], got 'best'"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number >= 0 or None (0 and None: no clipping), "
                             "got nan"),
    (["--mixup", "inf"], "mixup must be a finite number >= 0, got inf"),
    (["--weight-decay", "-1"], "weight_decay must be a finite number >= 0, got -1.0"),
    (["--gamma", "0"], "gamma must be a finite number > 0, got 0.0"),
    (["--dropout", "1"], "dropout must be in [0, 1), got 1.0"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 1], got 2.0"),
    (["--step-size", "0"], "step_size must be >= 1, got 0"),
    (["--img-size", "0"], "img_size must be >= 1, got 0"),
    (["--warmup-epochs", "-5"], "warmup_epochs must be >= 0, got -5"),
    (["--warmup-steps", "-1"], "warmup_steps must be >= 0 or None, got -1"),
    (["--threads", "-1"], "threads must be >= 0 or None (0 and None: torch's default), got -1"),
    (["--device", "foo"], "device must be auto, cpu, cuda, cuda:<index> or another torch device, got 'foo'"),
    (["--run-name", "../x"], "run_name must be a plain folder name, got '../x'"),
    (["--resume", "--overwrite"], "resume and overwrite exclude each other"),
    (["--seed", "-1"], "seed must be >= 0, got -1"),
    (["--dim", "10", "--heads", "4"], "dim must be divisible by heads (each head takes dim / heads "
                                      "features), got dim=10, heads=4"),
    (["--budget", "0.1"], "budget and warmup_steps count optimizer steps, so they need steps; got "
                          "budget=0.1, warmup_steps=None, steps=None"),
    (["--task", "lra-listops", "--steps", "2"], "steps x budget = 2 x 1.0 = 2 optimizer steps, fewer than "
                                                "epochs = 10 evaluation rounds"),
    (["--task", "image", "--length-buckets", "8"], "task 'image' does not use length_buckets=8"),
])
def test_bad_option_values_are_one_line(capsys, argv, message):
    assert message in one_line_error(capsys, ["train", *argv])


@pytest.mark.parametrize("argv, message", [
    (["train", "--compile", "on", "--compile-backend", "foo"], "compile_backend must be one of ["),
    (["train", "--compile", "cudagraphs"], "compile='cudagraphs' needs a CUDA device, got device cpu"),
    (["sweep", "--set", "compile=cudagraphs", "--datasets", "JapaneseVowels"], "needs a CUDA device"),
])
def test_machine_checks_come_before_the_data(tmp_path, monkeypatch, capsys, argv, message):
    """What depends on this machine (the device, compile mode and backend) is checked before any
    data loads or run folder is made (an unknown backend was a traceback after both)."""
    if torch.cuda.is_available() and "cudagraphs" in " ".join(argv):
        pytest.skip("CUDA graphs run where there is CUDA")

    def no_data(cfg):
        raise AssertionError("data loaded before the machine checks")

    monkeypatch.setattr("primal_dual_attention.training.tasks.build_task", no_data)
    where = ["--out-dir", str(tmp_path)] if argv[0] == "train" else ["--out", str(tmp_path)]
    assert message in one_line_error(capsys, [*argv, *where])
    assert not any(tmp_path.rglob("seed0"))


def test_a_compile_backend_left_unused_is_said():
    with pytest.warns(UserWarning, match="compile_backend='aot_eager' is unused: compile='off' runs eagerly"):
        TrainConfig(compile="off", compile_backend="aot_eager", device="cpu").check_here()


def test_reliability_doc_names_only_tests_that_exist():
    """docs/reliability.md is the index of these tests: every test it names is there (a cell's
    ``::name`` continues the file named before it)."""
    import re

    tests = Path(__file__).parent
    named, current = [], None
    for file, name in re.findall(r"`(?:(test_\w+\.py))?::(\w+)`",
                                 (tests.parent / "docs" / "reliability.md").read_text()):
        current = file or current
        named.append((current, name))
    assert len(named) > 40
    missing = [f"{f}::{n}" for f, n in named if f"def {n}(" not in (tests / f).read_text()]
    assert not missing


def test_exclusive_lock_serialises_processes(tmp_path):
    """`pda bench model --timing-lock`: a second process waits while the first holds the lock."""
    import subprocess
    import sys
    import time

    from primal_dual_attention.utils import exclusive

    lock = tmp_path / "device.lock"
    code = ("import sys, time; from primal_dual_attention.utils import exclusive\n"
            "with exclusive(sys.argv[1]): print(time.monotonic())")
    with exclusive(lock):
        other = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        released = time.monotonic()
    acquired = float(other.communicate(timeout=60)[0])
    assert acquired >= released
    with exclusive(None):  # no lock asked for: nothing to wait for
        pass


def _subcommands(parser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import argparse

    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _subcommands(sub, prefix + (name,))
    return found


@pytest.mark.parametrize("command", _subcommands(build_parser()), ids=" ".join)
def test_every_help_runs(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pda" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--attention-options", "{a: "], "argument --attention-options: not valid YAML"),
    (["sweep", "--set", "lr=[1,"], "argument --set: not valid YAML"),
    (["bench", "attention", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got '0'"),
    (["bench", "precision", "--precisions", "fp8"], "argument --precisions: unknown precision(s) ['fp8']"),
    (["sweep", "--workers", "0"], "argument --workers: expected an integer >= 1, got '0'"),
    (["heads", "x.pt", "--samples", "0"], "argument --samples: expected an integer >= 1, got '0'"),
    (["bench", "scaling", "--time-limit", "inf"], "argument --time-limit: expected a finite number > 0"),
])
def test_bad_arguments_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_checkpoint_mistakes_are_one_line(tmp_path, capsys):
    """A run folder instead of its checkpoint, and a layer the model does not have."""
    cfg = _one_epoch(tmp_path / "runs")
    err = one_line_error(capsys, ["eval", str(cfg.run_dir())])
    assert "is a folder; name a checkpoint file in it (best.pt, last.pt)" in err
    err = one_line_error(capsys, ["heads", str(cfg.run_dir() / "best.pt"), "--layer", "2", "--samples", "4",
                                  "--out", str(tmp_path / "heads")])
    assert "layer must be in 1..1" in err and "got 2" in err


def test_config_that_is_not_text_is_one_line(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"epochs: \xff\xfe\n")
    err = one_line_error(capsys, ["train", "--config", str(path)])
    assert f"{path}: not a UTF-8 text file" in err


def test_report_never_replaces_a_readme_it_did_not_write(tmp_path, capsys):
    own = tmp_path / "README.md"
    own.write_text("# My project\n")
    err = one_line_error(capsys, ["report", "--results", str(tmp_path)])
    assert "its README.md was not written by pda report" in err
    assert own.read_text() == "# My project\n"
    err = one_line_error(capsys, ["report", "--results", str(tmp_path / "missing")])
    assert "is not a folder" in err
    results = tmp_path / "results"
    results.mkdir()
    assert main(["report", "--results", str(results)]) == 0  # a new results folder is fine
    assert main(["report", "--results", str(results)]) == 0  # and its own README is replaced


def test_a_tuple_option_is_the_same_run_as_its_saved_list(tmp_path):
    """``head_scales=(1, 2)`` from Python is saved as the YAML list ``[1, 2]``: resuming is the
    same run, not one with other options."""
    from primal_dual_attention.training.engine import changed_options

    cfg = replace(TrainConfig(), variant="sh", heads=2, head_scales=(1, 2)).validate()
    saved = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert changed_options(saved, cfg) == ""
    assert changed_options(cfg.to_dict(), cfg) == ""  # last.pt's config keeps the tuple
    assert changed_options(saved, replace(cfg, head_scales=(2, 1))) == "head_scales: [1, 2] -> [2, 1]"
