"""Timing probe for the LM table (issue 14), run before any training: how many steps fit.

Times, on random bytes and untrained weights (no accuracy is seen), one training step, one
evaluation batch and one generation step of every variant of ``configs/lm/imdb.yaml`` on
``--threads`` threads, models the wall time of a run of ``S`` steps (training, the validation
rounds, the engine's test pass, ``lm_report evaluate`` and two data loads), and picks the largest
``S`` (a multiple of 100) for which ``--seeds`` seeds of the ``--fit`` variants fit in
``--hours``; the others (causal linear BN: O(N^2 D) elementwise work, no BLAS) run after them
with the same ``S``, and their extra time is reported. Writes ``results/lm/probe.md``.

    python scripts/lm_probe.py --hours 4
    python scripts/lm_probe.py --variants softmax,linear_bn --fit softmax --steps 2500 --out F  # re-time
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from primal_dual_attention.analysis.lm_report import GENERATED_BYTES, SAMPLE_PROMPTS, TEST_WINDOWS
from primal_dual_attention.models.decoder import DecoderLM, NextTokenLM
from primal_dual_attention.training.config import TrainConfig, bundled_config, config_from_mapping

DATA_LOAD_SECONDS = 10.0  # reading the aclImdb zip, twice per run (training, evaluation)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe(cfg: TrainConfig, repeats: int) -> dict[str, float]:
    """Seconds per training step, per evaluation batch and per generated token (a batch of prompts)."""
    torch.manual_seed(0)
    length = cfg.max_len
    kwargs = dict(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                  attention=cfg.attention())
    model = NextTokenLM(256, length, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randint(0, 256, (cfg.batch_size, length))
    y = torch.randint(0, 256, (cfg.batch_size * length,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    batch = torch.randint(0, 256, (cfg.eval_batch_size, length))

    def evaluate() -> None:
        with torch.inference_mode():
            model(batch)

    generator = DecoderLM(256, length, **kwargs).eval()
    prompts = torch.randint(0, 256, (SAMPLE_PROMPTS, 64))
    tokens = 32
    generate = median_seconds(lambda: generator.generate(prompts, tokens, temperature=0),
                              max(1, repeats // 3), 1)
    return {"step": median_seconds(step, repeats), "eval": median_seconds(evaluate, repeats),
            "token": generate / tokens}


def run_seconds(cfg: TrainConfig, times: dict[str, float], steps: int) -> float:
    val_batches = math.ceil(cfg.max_eval_samples / cfg.eval_batch_size)
    evaluation = (cfg.epochs + 1) * val_batches * times["eval"]  # validation rounds + the engine's test pass
    report = math.ceil(TEST_WINDOWS / cfg.eval_batch_size) * times["eval"] + GENERATED_BYTES * times["token"]
    return steps * times["step"] + evaluation + report + 2 * DATA_LOAD_SECONDS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="softmax,bn,sh,bn_sh,linear,linear_bn")
    parser.add_argument("--fit", default="softmax,bn,sh,bn_sh,linear", help="variants the budget is sized on")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--hours", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--steps", type=int, help="model this budget instead of choosing one (re-timing)")
    parser.add_argument("--out", default="results/lm/probe.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = bundled_config("lm", "imdb", TrainConfig(task="lm", dataset="imdb"))
    variants = args.variants.split(",")
    times = {}
    for variant in variants:
        cfg = config_from_mapping({"variant": variant}, "probe", base).validate()
        times[variant] = probe(cfg, args.repeats)
        print(f"{variant:10} step {times[variant]['step']:.3f} s  eval batch {times[variant]['eval']:.3f} s  "
              f"generation step {times[variant]['token'] * 1e3:.1f} ms", flush=True)

    fit = args.fit.split(",")
    slow = [v for v in variants if v not in fit]

    def total(steps: int, group: list[str]) -> float:
        return args.seeds * sum(run_seconds(base, times[v], steps) for v in group)

    steps = args.steps or 100
    while not args.steps and total(steps + 100, fit) <= args.hours * 3600:
        steps += 100
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Timing probe for the LM table", "",
        f"`python {' '.join(sys.argv)}` — "
        f"{'a re-timing of a fixed budget' if args.steps else 'run before any training run'} "
        "(random bytes, untrained weights), "
        f"{args.threads} thread(s), torch {torch.__version__}, {platform.machine()}, "
        f"load average {load:.1f} when it finished.", "",
        f"Config: `configs/lm/imdb.yaml` (context {base.max_len}, batch {base.batch_size}, dim {base.dim}, "
        f"depth {base.depth}, {base.heads} heads).", "",
        "| variant | training step (s) | eval batch (s) | generation step (ms) | "
        f"one run of {steps} steps (min) |", "|---|---|---|---|---|"]
    for variant in variants:
        t = times[variant]
        lines.append(f"| {variant} | {t['step']:.3f} | {t['eval']:.3f} | {t['token'] * 1e3:.1f} | "
                     f"{run_seconds(base, t, steps) / 60:.1f} |")
    modelled = (f"{total(steps, fit) / 3600:.2f} h modelled (training, validation rounds, the final test "
                "passes, generation, data loading)")
    if args.steps:
        lines += ["", f"**Given budget: {steps} steps** (`--steps`, not chosen here): {args.seeds} seeds of "
                  f"{', '.join(fit)} take {modelled}."]
    else:
        lines += ["", f"**Chosen budget: {steps} steps** — the largest multiple of 100 for which "
                  f"{args.seeds} seeds of {', '.join(fit)} fit in {args.hours:g} h: {modelled}."]
    if slow:
        lines += ["", f"{', '.join(slow)} run after them with the same budget: "
                  f"{total(steps, slow) / 3600:.2f} h more ({args.seeds} seeds)."]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-3:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
