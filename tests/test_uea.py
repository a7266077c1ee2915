"""UEA loading, the time-series model, the engine (protocols, resume) and the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from primal_dual_attention.attention import AttentionConfig
from primal_dual_attention.cli import main
from primal_dual_attention.data.common import stratified_split
from primal_dual_attention.data.uea import TsFormatError, load_uea, read_ts
from primal_dual_attention.models.timeseries import TimeSeriesTransformer
from primal_dual_attention.training.config import TrainConfig, load_yaml_config
from primal_dual_attention.training.engine import fit, load_checkpoint, seed_everything
from primal_dual_attention.training.tasks import build_task

HEADER = "@problemName Toy\n@timeStamps false\n@missing {missing}\n@univariate false\n" \
         "@dimensions 2\n@equalLength {equal}\n{length}@classLabel true a b\n@data\n"


def write_ts(path: Path, rows: list[str], *, equal: bool = True, missing: bool = False,
             newline: str = "\n") -> Path:
    length = "@seriesLength 3\n" if equal else ""
    text = HEADER.format(missing=str(missing).lower(), equal=str(equal).lower(), length=length)
    text += "\n".join(rows) + "\n"
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def toy_dataset(folder: Path, *, equal: bool = True, missing: bool = False, newline: str = "\n"):
    folder.mkdir(parents=True, exist_ok=True)
    if equal:
        train = ["1,2,3:4,5,6:a", "2,3,4:5,6,7:b", "0,1,2:1,1,1:a", "5,5,5:0,0,0:b"]
    else:
        train = ["1,2,3,4:4,5,6,7:a", "2,3:5,6:b", "0,1,2:1,1,1:a", "5,5,5,5,5:0,0,0,0,0:b"]
    if missing:
        train[0] = "1,?,3:4,5,NaN:a"
    test = ["1,2,3:4,5,6:b", "9,9,9,9,9,9:1,1,1,1,1,1:a"] if not equal else ["1,2,3:4,5,6:b"]
    write_ts(folder / "Toy_TRAIN.ts", train, equal=equal, missing=missing, newline=newline)
    write_ts(folder / "Toy_TEST.ts", test, equal=equal, missing=missing, newline=newline)
    return folder


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_equal_length_loading_and_standardisation(tmp_path, newline):
    data = load_uea("Toy", toy_dataset(tmp_path / "Toy", newline=newline).parent)
    assert data.train.x.shape == (4, 3, 2) and data.test.x.shape == (1, 3, 2)
    assert data.classes == ["a", "b"] and data.train.y.tolist() == [0, 1, 0, 1]
    assert not data.train.mask.any()
    flat = data.train.x.reshape(-1, 2)
    torch.testing.assert_close(flat.mean(0), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.std(0, unbiased=False), torch.ones(2), atol=1e-5, rtol=0)


def test_unequal_length_padding_and_truncation(tmp_path):
    data = load_uea("Toy", toy_dataset(tmp_path, equal=False))
    assert data.max_len == 5
    assert (~data.train.mask).sum(1).tolist() == [4, 2, 3, 5]
    assert (data.train.x[1, 2:] == 0).all()
    assert data.truncated_test == 1 and data.test.x.shape[1] == 5


def test_missing_values_become_finite(tmp_path):
    data = load_uea("Toy", toy_dataset(tmp_path, missing=True))
    assert torch.isfinite(data.train.x).all()


@pytest.mark.parametrize(
    "rows,line,reason",
    [
        (["1,2,3:4,5,6:a", "1,2,3:4,5"], 11, "expected 2 channels and a label"),
        (["1,2,3:4,5,6:a", "1,2,x:4,5,6:b"], 11, "cannot read 'x'"),
        (["1,2,3:4,5,6:a", "1,2,3:4,5,6:zebra"], 11, "class label 'zebra'"),
        ([], 10, "no cases after @data"),
    ],
)
def test_corrupt_file_error_names_file_and_line(tmp_path, rows, line, reason):
    path = write_ts(tmp_path / "Bad_TRAIN.ts", rows)
    with pytest.raises(TsFormatError, match=rf"Bad_TRAIN\.ts:{line}: .*{reason}"):
        read_ts(path)


def test_explicit_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no Nope_TRAIN.ts"):
        load_uea("Nope", tmp_path)


def test_stratified_split_is_stratified_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 5)
    keep, hold = stratified_split(labels, 0.2, seed=3)
    assert sorted(labels[hold].tolist()) == [0, 0, 1]
    assert set(keep) | set(hold) == set(range(15)) and not set(keep) & set(hold)
    assert (stratified_split(labels, 0.2, seed=3)[1] == hold).all()


@pytest.mark.parametrize("variant", ["softmax", "bn", "sh", "bn_sh", "linear_bn"])
@pytest.mark.parametrize("pooling", ["flatten", "mean"])
def test_padding_never_changes_a_prediction(variant, pooling):
    model = TimeSeriesTransformer(3, 4, 12, dim=16, depth=2, num_heads=4, mlp_dim=32,
                                  attention=AttentionConfig(variant=variant), pooling=pooling).eval()
    series = torch.randn(1, 7, 3)
    batch = torch.randn(2, 12, 3) * 50
    batch[0, :7] = series[0]
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 7:] = True
    alone = model(series)
    together = model(batch, mask)[0]
    torch.testing.assert_close(together, alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pooling", ["flatten", "mean"])
def test_non_finite_values_in_padded_steps_stay_inert(pooling):
    """NaN, inf or huge values where the mask says padding (a common way to pad series) leave the
    valid logits as they were (SPEC.md §2), as the attention layer alone already did."""
    model = TimeSeriesTransformer(3, 4, 12, dim=16, depth=2, num_heads=4, mlp_dim=32, pooling=pooling).eval()
    batch = torch.randn(2, 12, 3)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 7:] = True
    expected = model(batch, mask)
    for junk in (float("nan"), float("inf"), 1e30):
        batch[0, 7:] = junk
        torch.testing.assert_close(model(batch, mask), expected)


def test_time_series_model_names_bad_shapes():
    model = TimeSeriesTransformer(3, 2, 5, dim=8, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, C=3\), got \(1, 4, 2\)"):
        model(torch.randn(1, 4, 2))
    with pytest.raises(ValueError, match=r"must have shape \(B, N\) = \(1, 4\), got \(1, 5\)"):
        model(torch.randn(1, 4, 3), torch.zeros(1, 5, dtype=torch.bool))  # was torch's broadcast error
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        TimeSeriesTransformer(3, 0, 5)


def test_a_test_file_with_other_channels_is_an_error(tmp_path):
    folder = toy_dataset(tmp_path / "Toy")
    one_channel = (folder / "Toy_TEST.ts").read_text().replace("@dimensions 2", "@dimensions 1")
    (folder / "Toy_TEST.ts").write_text(one_channel.replace("1,2,3:4,5,6:b", "1,2,3:b"))
    with pytest.raises(ValueError, match="Toy test: case 0 has 1 channels, but the training split's first"):
        load_uea("Toy", folder)


def test_longer_sequence_than_positional_embedding_is_rejected():
    model = TimeSeriesTransformer(3, 2, 5, dim=8, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="exceeds the positional embedding's max_len 5"):
        model(torch.randn(1, 6, 3))


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(dataset="JapaneseVowels", protocol="paper", dim=32, depth=1, heads=4, mlp_dim=64, epochs=2,
                  batch_size=16, lr=3e-3, out_dir=str(tmp_path), progress=False, threads=1)
    return replace(TrainConfig(), **(values | overrides)).validate()


def run(cfg: TrainConfig):
    seed_everything(cfg.seed)
    return fit(cfg, build_task(cfg))


def test_two_epochs_on_japanese_vowels_learn(tmp_path):
    cfg = tiny_config(tmp_path, variant="bn_sh", protocol="clean")
    result = run(cfg)
    assert result.test_accuracy > 2 / 9  # twice chance (1/9)
    assert (cfg.run_dir() / "best.pt").exists() and (cfg.run_dir() / "summary.json").exists()


def test_a_run_stopped_before_its_summary_finishes_on_resume(tmp_path):
    """A crash after the last epoch's checkpoint (during the final test evaluation) leaves no
    summary.json: --resume finishes the run instead of reporting it forever unfinished."""
    cfg = tiny_config(tmp_path, protocol="clean", epochs=1)
    first = run(cfg)
    (cfg.run_dir() / "summary.json").unlink()
    again = run(replace(cfg, resume=True))
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["test_accuracy"] == again.test_accuracy == first.test_accuracy


def test_a_diverged_model_is_an_error_not_the_selected_epoch(tmp_path):
    """One step at lr 1e30 makes the weights non-finite: the validation loss says so, and the
    run stops instead of keeping that epoch as its best."""
    cfg = tiny_config(tmp_path, protocol="clean", epochs=1, batch_size=512, lr=1e30, grad_clip=0.0)
    with pytest.raises(FloatingPointError, match="non-finite val loss"):
        run(cfg)


@pytest.mark.parametrize("compiled", [{}, {"compile": "on", "compile_backend": "eager"}],
                         ids=["eager", "compiled"])
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, compiled):
    import primal_dual_attention.training.engine as engine

    full = run(tiny_config(tmp_path / "full", epochs=3, **compiled))

    original, calls = engine._train_epoch, []

    def crash_on_third_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_train_epoch", crash_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path / "split", epochs=3, **compiled))
    monkeypatch.setattr(engine, "_train_epoch", original)
    resumed = run(tiny_config(tmp_path / "split", epochs=3, resume=True, **compiled))

    assert [r["test_acc"] for r in resumed.history] == [r["test_acc"] for r in full.history]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    a = load_checkpoint(tiny_config(tmp_path / "full").run_dir() / "last.pt")["model"]
    b = load_checkpoint(tiny_config(tmp_path / "split").run_dir() / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(tiny_config(tmp_path / "split").run_dir() / "log.csv") as handle:
        assert [int(r["epoch"]) for r in csv.DictReader(handle)] == [1, 2, 3]


@pytest.mark.parametrize("options", [{}, {"steps": 30, "length_buckets": 4, "dropout": 0.2}],
                         ids=["epochs", "steps"])
def test_a_mid_round_checkpoint_resumes_exactly(tmp_path, monkeypatch, capsys, options):
    """checkpoint_every=2: a crash at batch 5 of round 2 loses one step, not the round; --resume
    continues from step 4 and ends as the uninterrupted run (weights, losses, log)."""
    import primal_dual_attention.training.engine as engine

    def config(folder: str, **extra) -> TrainConfig:
        return tiny_config(tmp_path / folder, epochs=3, checkpoint_every=2, **options, **extra)

    full = run(config("full"))
    original = engine._check_finite

    def crash_at_batch_5_of_round_2(tensor, what):
        if what == "the inputs of epoch 2, batch 5":
            raise KeyboardInterrupt("simulated crash")
        return original(tensor, what)

    monkeypatch.setattr(engine, "_check_finite", crash_at_batch_5_of_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(config("cut"))
    state = load_checkpoint(config("cut").run_dir() / "last.pt")
    assert (state["epoch"], state["round"]["epoch"], state["round"]["step"]) == (0, 1, 4)
    monkeypatch.setattr(engine, "_check_finite", original)
    capsys.readouterr()
    resumed = run(config("cut", resume=True))
    assert "last.pt holds epoch 1, step 4 of epoch 2" in capsys.readouterr().out
    for key in ("train_loss", "train_acc", "test_acc", "lr"):
        assert [r[key] for r in resumed.history] == [r[key] for r in full.history], key
    a = load_checkpoint(config("full").run_dir() / "last.pt")
    b = load_checkpoint(config("cut").run_dir() / "last.pt")
    assert "round" not in b and b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_resume_never_continues_a_checkpoint_of_another_budget(tmp_path):
    first = run(tiny_config(tmp_path, epochs=1))
    second = run(tiny_config(tmp_path, epochs=2, resume=True))  # its own folder, from scratch
    assert second.run_dir == first.run_dir + "-2" and len(second.history) == 2
    with pytest.raises(ValueError, match=r"seed0 holds a run with other options \(epochs: 1 -> 2\); "
                                         "pass --overwrite to replace it or another --run-name"):
        run(tiny_config(tmp_path, epochs=2, resume=True, run_name="seed0"))
    run(tiny_config(tmp_path, epochs=1, resume=True, threads=2, progress=True))  # running options may differ


def test_yaml_config_rejects_unknown_keys_and_wrong_types(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown option.*learning_rate"):
        load_yaml_config(bad)
    bad.write_text("epochs: three\n")
    with pytest.raises(ValueError, match="option 'epochs' must be of type int, got str 'three'"):
        load_yaml_config(bad)
    bad.write_text("head_scales: [1, two]\n")
    with pytest.raises(ValueError, match=r"'head_scales' must be of type list\[int\] \| None, got list"):
        load_yaml_config(bad)


def test_cli_help_and_invalid_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--variant" in capsys.readouterr().out
    assert main(["train", "--variant", "quantum", "--epochs", "1"]) == 2
    assert "variant must be one of" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "primal_dual_attention.cli", "train", "--epochs", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--epochs" in result.stderr


def test_eval_command_reproduces_the_run(tmp_path, capsys):
    """`pda eval` scores the run's own draw of max_eval_samples (and, with --all-samples, every
    sample): the run's test accuracy, not another split's."""
    cfg = tiny_config(tmp_path, epochs=1, protocol="clean", max_eval_samples=50)
    result = run(cfg)
    capsys.readouterr()
    assert main(["eval", str(cfg.run_dir() / "best.pt")]) == 0
    out = capsys.readouterr().out
    assert "val: accuracy" in out
    assert f"test: accuracy {result.test_accuracy:.4f}" in out and "(50 targets)" in out
    assert main(["eval", str(cfg.run_dir() / "best.pt"), "--all-samples"]) == 0
    assert "(370 targets)" in capsys.readouterr().out  # JapaneseVowels' whole test split


def test_a_checkpoint_of_an_earlier_version_still_evaluates(tmp_path, capsys):
    """A saved config that a new run would refuse (an option the task ignores, fewer steps than
    rounds: both were accepted before) is read as what the run did, not refused."""
    cfg = tiny_config(tmp_path, epochs=1)
    run(cfg)
    path = cfg.run_dir() / "best.pt"
    state = torch.load(path, weights_only=False)
    state["config"] |= {"max_len": 64, "steps": 1, "epochs": 2}
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert main(["eval", str(old)]) == 0
    assert "test: accuracy" in capsys.readouterr().out


def test_fit_refuses_fewer_steps_than_rounds_without_validate(tmp_path):
    cfg = replace(tiny_config(tmp_path), steps=10, budget=0.01)  # 0 steps, as validate() would refuse
    with pytest.raises(ValueError, match="= 0 optimizer steps, fewer than epochs = 2 .*raise steps or"):
        run(cfg)


def test_single_class_training_split_is_refused(tmp_path):
    folder = tmp_path / "One"
    folder.mkdir()
    write_ts(folder / "One_TRAIN.ts", ["1,2,3:4,5,6:a", "2,3,4:5,6,7:a"])
    write_ts(folder / "One_TEST.ts", ["1,2,3:4,5,6:a"])
    with pytest.raises(ValueError, match="single class"):
        load_uea("One", tmp_path)


def test_test_labels_unseen_in_training_are_refused(tmp_path):
    folder = tmp_path / "Odd"
    folder.mkdir()
    write_ts(folder / "Odd_TRAIN.ts", ["1,2,3:4,5,6:a", "2,3,4:5,6,7:b"])
    (folder / "Odd_TEST.ts").write_text(
        HEADER.format(missing="false", equal="true", length="@seriesLength 3\n").replace(
            "@classLabel true a b", "@classLabel true a b c") + "1,2,3:4,5,6:c\n")
    with pytest.raises(ValueError, match=r"labels \['c'\] are not among the training classes"):
        load_uea("Odd", tmp_path)


def test_empty_training_split_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    seed_everything(0)
    task = build_task(cfg)
    task.train = task.train.subset(torch.arange(0))
    with pytest.raises(ValueError, match="training split is empty"):
        fit(cfg, task)


@pytest.mark.parametrize("total, rounds", [(7, 2), (68, 10), (1113, 10), (2000, 10), (3, 3)])
def test_rounds_share_exactly_the_budgeted_steps(total, rounds):
    """Every round took ceil(total / rounds) steps, e.g. 1,120 for a stated 1,113; now the rounds
    hold exactly ``total``, one step apart at most, each starting where the last ended."""
    from primal_dual_attention.training.engine import round_of_step, round_steps

    parts = [round_steps(total, rounds, index) for index in range(rounds)]
    assert sum(steps for _, steps in parts) == total
    # the schedule's round of each step (step decays, warm-up epochs) is the round that runs it
    assert [round_of_step(total, rounds, step) for step in range(total)] == [
        index for index, (_, steps) in enumerate(parts) for _ in range(steps)]
    assert max(s for _, s in parts) - min(s for _, s in parts) <= 1
    assert all(first == sum(s for _, s in parts[:index]) for index, (first, _) in enumerate(parts))


def test_a_step_budgeted_run_takes_exactly_its_steps(tmp_path):
    cfg = tiny_config(tmp_path, steps=7, epochs=2, batch_size=8)
    run(cfg)
    assert load_checkpoint(cfg.run_dir() / "last.pt")["scheduler"]["last_epoch"] == 7  # was 8
