"""Operations one attention layer dispatches per variant (forward + backward), the eager cost of
a small model (issue 13). The counter is tests/test_speed.py's; run it on any checkout whose
``MultiHeadAttention`` takes an ``AttentionConfig`` to compare commits:

    python scripts/count_ops.py                      # this checkout
    PYTHONPATH=<other checkout>/src python scripts/count_ops.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_speed import layer_ops  # noqa: E402

import primal_dual_attention  # noqa: E402

SETTINGS = (("2-D grid 8x8 + class token, 4 heads", True, False), ("1-D, 64 tokens, 8 heads", False, False),
            ("1-D padded", False, True))


def main() -> None:
    source = Path(primal_dual_attention.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"commit {commit}: operations per layer, forward + backward (batch 2, dim 128)\n")
    print("| variant | " + " | ".join(name for name, _, _ in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for variant in ("softmax", "bn", "sh", "bn_sh", "linear", "linear_bn_sh"):
        counts = [f"{layer_ops(variant, grid=grid, padded=padded)} "
                  f"({layer_ops(variant, grid=grid, padded=padded, kernels=True)})"
                  for _, grid, padded in SETTINGS]
        print(f"| {variant} | " + " | ".join(counts) + " |")


if __name__ == "__main__":
    main()
