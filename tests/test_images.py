"""The CIFAR zip reader and the in-memory image batches."""

from __future__ import annotations

import io
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from primal_dual_attention.data.images import ImageSplit, load_cifar10, read_image_zip

CLASSES = ["airplane", "automobile", "bird"]


def write_zip(path, per_class: tuple[tuple[str, int], ...] = (("train", 3), ("test", 2))):
    with zipfile.ZipFile(path, "w") as archive:
        for split, count in per_class:
            for c, name in enumerate(CLASSES):
                for i in range(count):
                    pixels = np.full((32, 32, 3), 40 * c + i, dtype=np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
                    archive.writestr(f"{split}/{name}/{i:04d}.jpg", buffer.getvalue())
        archive.writestr("train/.DS_Store", b"junk")
    return path


def test_zip_reader_counts_and_label_mapping(tmp_path):
    path = write_zip(tmp_path / "c.zip")
    images, labels, classes = read_image_zip(path, "train")
    assert classes == CLASSES and images.shape == (9, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert abs(int(images[3].float().mean()) - 40) <= 2  # automobile image 0 has value 40
    train, test, classes = load_cifar10(path)
    assert len(train) == 9 and len(test) == 6 and train.augment and not test.augment


def test_missing_split_is_a_clear_error(tmp_path):
    path = write_zip(tmp_path / "c.zip", (("train", 1),))
    with pytest.raises(ValueError, match="no 'test/<class>/<image>'"):
        read_image_zip(path, "test")


def test_augmented_batches_keep_shape_and_are_seeded():
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    split = ImageSplit(images, torch.arange(10), augment=True)
    a = [x for x, _, _ in split.batches(4, torch.Generator().manual_seed(1))]
    b = [x for x, _, _ in split.batches(4, torch.Generator().manual_seed(1))]
    assert [t.shape for t in a] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    plain = next(ImageSplit(images, torch.arange(10)).batches(10))[0]
    assert plain.shape == (10, 3, 32, 32)


@pytest.mark.parametrize("variant", ["softmax", "bn_sh"])
def test_image_task_trains_through_the_engine(tmp_path, variant):
    pytest.importorskip("timm")
    from primal_dual_attention.cli import main

    path = write_zip(tmp_path / "c.zip")
    code = main(["train", "--task", "image", "--dataset", "CIFAR10", "--data-dir", str(path),
                 "--variant", variant, "--epochs", "1", "--batch-size", "4", "--optimizer", "adamw",
                 "--no-progress", "--out-dir", str(tmp_path / "runs"), "--threads", "1"])
    assert code == 0
    run = tmp_path / "runs" / "image" / "CIFAR10" / "clean" / variant / "seed0"  # the bundled config
    assert (run / "last.pt").is_file()
    header = (run / "log.csv").read_text().splitlines()[0].split(",")
    assert {"val_acc", "test_acc"} <= set(header)  # track_test: test accuracy logged for the curves


def test_image_sweep_report_and_cost_bench(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import csv

    from primal_dual_attention.cli import main

    def read(path):
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    path = write_zip(tmp_path / "c.zip", (("train", 5), ("test", 2)))
    results = tmp_path / "runs"  # the sweep's own folder
    sweep = ["sweep", "--task", "image", "--data-dir", str(path), "--seeds", "0",
             "--variants", "softmax,sh", "--epochs", "2", "--set", "batch_size=4",
             "--set", "eval_batch_size=8", "--out", str(results)]
    assert main(sweep) == 0
    rows = read(results / "runs.csv")
    assert [(r["variant"], r["epochs"], r["protocol"]) for r in rows] == [
        ("softmax", "2", "clean"), ("sh", "2", "clean")]
    assert main(sweep) == 0  # finished runs are skipped, not appended again
    assert len(read(results / "runs.csv")) == 2
    threads = torch.get_num_threads()
    asked = threads - 1 if threads > 1 else 2  # fewer where possible: more would oversubscribe the CPU
    monkeypatch.setattr("primal_dual_attention.analysis.model_cost.cpu_load", lambda: 3.5)  # a busy CPU
    try:  # `--set threads` is honoured: another thread count than the sweep above left
        with pytest.warns(UserWarning, match="load average 3.5 before the bench"):
            assert main(["bench", "model", "--variants", "softmax,sh", "--batch", "4", "--repeats", "1",
                         "--device", "cpu", "--set", f"data_dir={path}", "--set", f"threads={asked}",
                         "--no-memory",  # its own test below: one fresh process per variant costs ~10 s
                         "--out", str(results), "--timing-lock", str(tmp_path / "device.lock")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert f"with {asked} threads" in (results / "speed.md").read_text()
    assert "; load average 3.5 before it" in (results / "cost_commands.txt").read_text()
    costs = {r["variant"]: r for r in read(results / "cost.csv")}
    assert float(costs["sh"]["gflops_fwd_per_sample"]) < float(costs["softmax"]["gflops_fwd_per_sample"])
    assert all(float(c["train_samples_per_s"]) > 0 for c in costs.values())
    assert {c["peak_train_mb"] for c in costs.values()} == {""}  # not measured: no number
    assert main(["sweep", "--task", "image", "--report-only", "--results", str(results)]) == 0
    report = (results / "README.md").read_text()
    assert "| softmax |" in report and "| sh |" in report and "(n=1)" in report
    assert (results / "accuracy_CIFAR10.png").is_file()
    assert all("worker(s)" in row["machine"] for row in read(results / "runs.csv"))


def test_cpu_peak_memory_of_a_training_step_is_measured_in_a_fresh_process(tmp_path):
    """`pda bench model`'s peak column on the CPU: the rise of the resident set's peak during one
    training step, measured in a spawned process (the only place where the kernel resets it)."""
    pytest.importorskip("timm")
    from pathlib import Path

    from primal_dual_attention.analysis import model_cost
    from primal_dual_attention.training.config import TrainConfig, bundled_config

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the peak RSS reset needs Linux's /proc/self/clear_refs")
    cfg = bundled_config("image", "CIFAR10", TrainConfig(task="image", dataset="CIFAR10"))
    cfg = replace(cfg, data_dir=str(write_zip(tmp_path / "c.zip")), variant="sh").validate()
    peak = model_cost._peak_memory(model_cost.prepare_model(cfg, 4, "cpu"))
    assert isinstance(peak, float) and 0 < peak < 1024


def test_step_profile_script_counts_each_variants_calls_by_kind(tmp_path, monkeypatch):
    """``scripts/profile_compiled_step.py`` (issue 13) on a tiny image set, eager: SH's head groups
    show as more SDPA calls per step than softmax's one call per layer."""
    pytest.importorskip("timm")
    import runpy
    import sys
    from pathlib import Path

    path, out = write_zip(tmp_path / "c.zip"), tmp_path / "profile.md"
    script = Path(__file__).resolve().parents[1] / "scripts" / "profile_compiled_step.py"
    monkeypatch.setattr(sys, "argv", [
        str(script), "--task", "image", "--dataset", "CIFAR10", "--batch", "2", "--variants", "softmax,sh",
        "--mode", "eager", "--steps", "1", "--threads", str(torch.get_num_threads()),
        "--set", f"data_dir={path}", "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    text = out.read_text()
    assert "--mode eager" in text and "## softmax" in text and "## sh" in text
    sdpa_row = next(line for line in text.splitlines() if line.startswith("| SDPA kernels |"))
    softmax_calls, sh_calls = (int(cell.split("(")[1].split()[0]) for cell in sdpa_row.split("|")[2:4])
    assert 0 < softmax_calls < sh_calls


def test_bad_sweep_override_is_a_clear_error(capsys):
    from primal_dual_attention.cli import main

    with pytest.raises(SystemExit):
        main(["sweep", "--task", "image", "--set", "no_equals_sign"])
    assert "OPTION=VALUE" in capsys.readouterr().err
