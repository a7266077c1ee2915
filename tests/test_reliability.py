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
