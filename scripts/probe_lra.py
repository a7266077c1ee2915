"""Timing probe for LRA runs (issue 16): seconds per training step, per variant and execution
option, on a few real batches, on the CPU or a GPU (`--device cuda`). It never trains long enough
to learn, and it never evaluates accuracy, so the budget it sets is fixed before any accuracy is
seen.

Each measurement builds the task's model exactly as `pda train` does (bundled
`configs/lra/<task>.yaml`, the same data pipeline), then runs the engine's training step
(autocast, forward, cross-entropy, backward, AdamW) on consecutive real batches of the configured
batch size: `--warmup` steps untimed (torch.compile compiles here), `--steps` timed. Inference is
timed on `--eval-batches` batches of the configured evaluation batch size. Peak memory is the
process's peak resident set (VmHWM) over the timed steps on the CPU, and the peak of
`torch.cuda.max_memory_allocated` over the timed steps on a GPU. `--json FILE` appends one JSON
line per measurement (`scripts/gpu_lra.sh` sizes its budget from them).

`--parallel 2` runs the same measurement in two processes at once (each with `--threads`
threads), which is what a sweep with `--workers 2` does; the aggregate rate is then
2 / (seconds per step of one process).

Usage: PYTHONPATH=src python scripts/probe_lra.py --task listops \
    --variants softmax,linear,bn,sh,bn_sh --precisions fp32,bf16 --threads 2 [--compile] [--parallel 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import replace


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(task_name: str, variant: str, precision: str, threads: int, compile_model: bool,
            warmup: int, steps: int, eval_batches: int, device_name: str = "cpu",
            buckets: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    from primal_dual_attention.training.config import TrainConfig, bundled_config
    from primal_dual_attention.training.engine import BucketedSplit, autocast, length_buckets, seed_everything
    from primal_dual_attention.training.tasks import build_task

    torch.set_num_threads(threads)
    base = bundled_config("lra", task_name, TrainConfig(task="lra", dataset=task_name))
    needed = (warmup + steps) * base.batch_size
    # generated tasks make only the samples a run uses: budget the probe to what it needs
    budget = max(needed / base.steps, base.epochs / base.steps)
    cfg = replace(base, variant=variant, precision=precision, budget=budget,
                  max_eval_samples=eval_batches * base.eval_batch_size, length_buckets=buckets,
                  out_dir=tempfile.mkdtemp(), progress=False).validate()
    seed_everything(0)
    task = build_task(cfg)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    model = task.model.to(device)
    run = torch.compile(model) if compile_model else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    train, test = task.train, task.test
    per_octave = length_buckets(cfg, model, device)  # the engine's batch widths (CUDA: buckets)
    if per_octave:
        train, test = (BucketedSplit(split, per_octave, model.max_len) for split in (train, test))
    generator = torch.Generator().manual_seed(0)
    batches = train.batches(cfg.batch_size, generator)

    def place(batch):
        return tuple(None if t is None else t.to(device, non_blocking=True) for t in batch)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def train_step(batch) -> None:
        x, mask, y = place(batch)
        with autocast(device, precision):
            logits = run(x, mask)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    start = time.perf_counter()
    for _ in range(warmup):
        train_step(next(batches))
    sync()
    warmup_s = time.perf_counter() - start
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    times, widths = [], []
    for _ in range(steps):
        batch = next(batches)
        widths.append(batch[0].shape[1])
        start = time.perf_counter()
        train_step(batch)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _status_mib("VmHWM")
    model.eval()
    eval_s, eval_n = 0.0, 0
    with torch.inference_mode():
        for index, (x, mask, _y) in enumerate(test.batches(cfg.eval_batch_size)):
            if index >= eval_batches:
                break
            x, mask = place((x, mask))
            start = time.perf_counter()
            with autocast(device, precision):
                run(x, mask)
            sync()
            eval_s += time.perf_counter() - start
            eval_n += len(x)
    return {"task": task_name, "device": str(device), "batch": cfg.batch_size,
            "full_steps": cfg.steps, "variant": variant, "precision": precision, "threads": threads,
            "compile": compile_model, "s_per_step": statistics.mean(times),
            "s_per_step_min": min(times), "s_per_step_max": max(times),
            "warmup_s": warmup_s, "mean_width": statistics.mean(widths),
            "eval_s_per_1k": 1000 * eval_s / max(eval_n, 1), "peak_mib": peak}


def _worker(args: tuple) -> dict:
    return measure(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="listops")
    parser.add_argument("--variants", default="softmax,linear,bn,sh,bn_sh")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="processes measuring at once")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--eval-batches", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--json", default=None, help="append one JSON line per measurement here")
    parser.add_argument("--length-buckets", type=int, default=None,
                        help="the engine's length_buckets (default: 8 on CUDA, 0 on the CPU)")
    args = parser.parse_args()

    import torch

    from primal_dual_attention.analysis.bench import machine_description

    torch.set_num_threads(args.threads)
    print(f"# machine: {machine_description()}; device {args.device}")
    print(f"# task {args.task}, {args.parallel} process(es) x {args.threads} thread(s), "
          f"compile={args.compile}, length_buckets={args.length_buckets}, warm-up {args.warmup} steps, "
          f"{args.steps} timed steps "
          "(the load average column shows other work on this shared machine)")
    print("| task | variant | precision | processes x threads | compile | s/step (mean) | min-max | "
          "mean batch width | warm-up s | aggregate steps/s | s per 1k steps (aggregate) | "
          "eval s / 1k samples | peak MiB | load avg (1 min) after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split(","):
        for precision in args.precisions.split(","):
            job = (args.task, variant, precision, args.threads, args.compile, args.warmup, args.steps,
                   args.eval_batches, args.device, args.length_buckets)
            if args.parallel == 1:
                results = [measure(*job)]
            else:
                with multiprocessing.get_context("spawn").Pool(args.parallel) as pool:
                    results = pool.map(_worker, [job] * args.parallel)
            s = statistics.mean(r["s_per_step"] for r in results)
            rate = sum(1 / r["s_per_step"] for r in results)
            r = results[0]
            print(f"| {args.task} | {variant} | {precision} | {args.parallel}x{args.threads} | "
                  f"{'yes' if args.compile else 'no'} | {s:.3f} | "
                  f"{min(x['s_per_step_min'] for x in results):.3f}-"
                  f"{max(x['s_per_step_max'] for x in results):.3f} | {r['mean_width']:.0f} | "
                  f"{r['warmup_s']:.1f} | {rate:.3f} | {1000 / rate:.0f} | "
                  f"{statistics.mean(x['eval_s_per_1k'] for x in results):.1f} | "
                  f"{max(x['peak_mib'] for x in results):.0f} | {os.getloadavg()[0]:.2f} |", flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    for result in results:
                        handle.write(json.dumps(result | {"processes": args.parallel}) + "\n")


if __name__ == "__main__":
    main()
