"""Bad input and honest defaults of the ``pda`` command (issue 15); docs/reliability.md is the
index of these tests."""

from __future__ import annotations

from pathlib import Path

from primal_dual_attention.cli import build_parser, resolve_config

README = Path(__file__).parents[1] / "README.md"


def test_clean_is_the_default_protocol_of_train_and_demo():
    assert resolve_config(build_parser().parse_args(["train"])).protocol == "clean"
    assert resolve_config(build_parser().parse_args(["train", "--protocol", "paper"])).protocol == "paper"
    demo = build_parser().parse_args(["demo"])
    assert demo.protocol == "clean"
    assert "default protocol is `clean`" in README.read_text()


def _one_epoch(tmp_path: Path, **options) -> None:
    from dataclasses import replace

    from primal_dual_attention.training.config import TrainConfig
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    cfg = replace(TrainConfig(), dim=8, depth=1, heads=2, mlp_dim=8, epochs=1, batch_size=64,
                  out_dir=str(tmp_path), threads=1, **options).validate()
    seed_everything(0)
    fit(cfg, build_task(cfg))


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
