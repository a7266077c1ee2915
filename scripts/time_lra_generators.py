"""Time the LRA generators on this machine and write results/lra/generators.md.

python scripts/time_lra_generators.py   (one thread; ListOps 5,000 expressions, Pathfinder 1,000 images)
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from primal_dual_attention.data.lra import generate_listops, generate_pathfinder
from primal_dual_attention.utils import machine_description


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    generate_listops(5000, seed=0)
    listops = time.perf_counter() - start
    start = time.perf_counter()
    generate_pathfinder(1000, seed=0)
    pathfinder = time.perf_counter() - start
    lines = ["# LRA generator speed", "",
             "Written by `python scripts/time_lra_generators.py` (one process, one thread).", "",
             f"- Machine: {machine_description()}",
             f"- ListOps: 5,000 expressions in {listops:.1f} s -> "
             f"{listops / 5000 * 1e5 / 60:.1f} min per 100k",
             f"- Pathfinder-32: 1,000 images in {pathfinder:.1f} s -> {pathfinder:.1f} ms per image, "
             f"{pathfinder * 200 / 60:.0f} min for LRA's 200k", ""]
    path = Path("results/lra/generators.md")
    path.write_text("\n".join(lines))
    print(path.read_text())


if __name__ == "__main__":
    main()
