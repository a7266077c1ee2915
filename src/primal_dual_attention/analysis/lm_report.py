"""The byte-level language-model experiment (issue 14): evaluate finished runs, write the report.

``python -m primal_dual_attention.analysis.lm_report evaluate RUN_DIR`` loads a run's ``best.pt``
(the round the validation loss chose) and writes ``lm_eval.json`` beside it: bits per byte on a
fixed draw of test windows, generation tokens/s through the decoding caches, the cache bytes per
token, and a few generated samples. ``... report --runs runs/lm --out results/lm`` copies every
run's log and evaluation under ``results/lm`` and writes ``results/lm/README.md`` from those
files alone (a table, a validation-bpb curve, samples).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from primal_dual_attention.analysis.uea_report import mean_std
from primal_dual_attention.utils import machine_description

TEST_WINDOWS = 2048
PROMPT_BYTES = 64
GENERATED_BYTES = 192
SAMPLE_PROMPTS = 3


def evaluate_run(run_dir: str | Path, test_windows: int = TEST_WINDOWS) -> dict[str, Any]:
    """Test bits per byte of ``best.pt``, generation speed, cache memory and samples of one run."""
    from primal_dual_attention.causal import cache_bytes_per_token
    from primal_dual_attention.models.decoder import DecoderLM
    from primal_dual_attention.training.config import saved_config
    from primal_dual_attention.training.engine import evaluate, limit, load_checkpoint
    from primal_dual_attention.training.tasks import build_task

    run_dir = Path(run_dir)
    cfg = saved_config(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir))
    if cfg.task != "lm":
        raise ValueError(f"{run_dir} is a run of task {cfg.task!r}; the LM report evaluates task 'lm' runs")
    task = build_task(cfg)
    state = load_checkpoint(run_dir / "best.pt")
    task.model.load_state_dict(state["model"])
    test = limit(task.test, test_windows)
    stats = evaluate(task.model, test, cfg.eval_batch_size)

    lm = DecoderLM(256, task.model.max_len, dim=cfg.dim, depth=cfg.depth, num_heads=cfg.heads,
                   mlp_dim=cfg.mlp_dim, dropout=0.0, attention=task.model.attention)
    lm.load_state_dict(task.model.state_dict())
    prompt = min(PROMPT_BYTES, lm.max_len // 4)
    new = min(GENERATED_BYTES, lm.max_len - prompt)
    prompts = torch.stack([torch.tensor(list(test.window(i)[:prompt])) for i in range(SAMPLE_PROMPTS)])
    start = time.perf_counter()
    sampler = torch.Generator().manual_seed(0)
    generated = lm.generate(prompts, new, temperature=0.8, top_k=40, generator=sampler)
    seconds = time.perf_counter() - start
    config = lm.attention
    cache = cache_bytes_per_token(config, cfg.heads, cfg.dim // cfg.heads, task.model.max_len) * cfg.depth
    history = state["history"]
    result = {
        "machine": machine_description(),  # the machine that trained and evaluated this run
        "variant": cfg.variant, "seed": cfg.seed, "steps": cfg.total_steps(), "context": task.model.max_len,
        "params": sum(p.numel() for p in lm.parameters()),
        "best_round": max(r["epoch"] for r in history if r.get("best")),
        "val_bpb": min(r["val_loss"] for r in history) / math.log(2),
        "test_bpb": stats.loss / math.log(2), "test_bytes": stats.samples,
        "train_tokens_per_s": float(np.median([r["train_samples_per_s"] for r in history])),
        "generate_tokens_per_s": SAMPLE_PROMPTS * new / seconds,
        "cache_bytes_per_token": cache,
        "samples": [{"prompt": bytes(row[:prompt].tolist()).decode("utf-8", "replace"),
                     "continuation": bytes(row[prompt:].tolist()).decode("utf-8", "replace")}
                    for row in generated],
    }
    (run_dir / "lm_eval.json").write_text(json.dumps(result, indent=2))
    return result


SEED_FOLDER = re.compile(r"seed\d+")


def collect(runs: Path, out: Path, log=print) -> None:
    """Copy ``<runs>/lm/<dataset>/clean/<variant>/seed<k>/{log.csv,lm_eval.json}`` under ``out``.

    Only ``seed<k>`` folders are seeds: ``seed<k>-<n>`` holds a run of the same seed with other
    options (``claim_run_dir``) and is left out, said so. The report describes one dataset, so
    evaluations of several are refused."""
    evaluations = sorted(runs.glob("lm/*/clean/*/seed*/lm_eval.json"))
    for other in (e.parent for e in evaluations if not SEED_FOLDER.fullmatch(e.parent.name)):
        log(f"left out {other}: a run of seed {other.name.split('-')[0][4:]} with other options")
    evaluations = [e for e in evaluations if SEED_FOLDER.fullmatch(e.parent.name)]
    datasets = sorted({e.parents[3].name for e in evaluations})
    if len(datasets) > 1:
        raise ValueError(f"--runs {runs} holds evaluated runs of datasets {datasets}; the report "
                         "describes one: point --runs at a folder of one dataset's runs")
    for evaluation in evaluations:
        run = evaluation.parent
        target = out / "runs" / run.parent.name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(evaluation, target / f"{run.name}.json")
        shutil.copyfile(run / "log.csv", target / f"{run.name}.csv")


def _read(out: Path) -> dict[str, list[tuple[dict, list[dict]]]]:
    """The copied runs per variant (registry order), seeds in numeric order."""
    from primal_dual_attention.attention import VARIANTS

    found: dict[str, list[tuple[dict, list[dict]]]] = defaultdict(list)
    paths = [p for p in out.glob("runs/*/seed*.json") if SEED_FOLDER.fullmatch(p.stem)]
    for path in sorted(paths, key=lambda p: (p.parent.name, int(p.stem[4:]))):
        with open(path.with_suffix(".csv"), newline="") as handle:
            found[path.parent.name].append((json.loads(path.read_text()), list(csv.DictReader(handle))))
    return {v: found[v] for v in VARIANTS if v in found}


def _plot(runs: dict[str, list[tuple[dict, list[dict]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for variant, entries in runs.items():
        curves = np.array([[float(r["val_loss"]) / math.log(2) for r in log] for _, log in entries])
        steps = np.arange(1, curves.shape[1] + 1) * entries[0][0]["steps"] / curves.shape[1]
        ax.plot(steps, curves.mean(0), label=variant)
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Byte-level IMDb LM: validation bits per byte\n(mean over seeds, band = min..max)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _verdict(runs: dict[str, list[tuple[dict, list[dict]]]]) -> list[str]:
    """Each variant against softmax: the difference of mean test bpb and whether it exceeds twice
    the standard error of that difference (seeds as samples)."""
    base = np.array([e["test_bpb"] for e, _ in runs.get("softmax", [])])
    lines = []
    for variant, entries in runs.items():
        if variant == "softmax" or len(base) < 2 or len(entries) < 2:
            continue
        values = np.array([e["test_bpb"] for e, _ in entries])
        diff = values.mean() - base.mean()
        error = math.sqrt(values.var(ddof=1) / len(values) + base.var(ddof=1) / len(base))
        word = ("no clear difference" if abs(diff) <= 2 * error
                else "better than softmax" if diff < 0 else "worse than softmax")
        lines.append(f"- `{variant}`: {diff:+.4f} bpb against softmax (2 x s.e. {2 * error:.4f}): {word}.")
    return lines


def write_report(out: str | Path) -> Path:
    """``out/README.md`` from the copied runs, ``out/probe.md`` and ``out/commands.txt``."""
    out = Path(out)
    runs = _read(out)
    lines = ["# Byte-level language model on IMDb reviews (issue 14)", "",
             "A decoder (`models/decoder.py`: byte embedding, learned positions, pre-norm causal blocks, "
             "tied head) trained on the bytes of the aclImdb train reviews (2 % held out for validation), "
             "evaluated on the test reviews. Every variant has the same parameters, steps and data order "
             "per seed; the validation loss picks the checkpoint (clean protocol). Bits per byte = "
             "cross-entropy / ln 2 on a fixed draw of test windows. One CPU thread per run.", ""]
    if (out / "commands.txt").is_file():
        commands = (out / "commands.txt").read_text().strip()
        lines += ["Commands (from the repository root):", "", "```", commands, "```", ""]
    if (out / "probe.md").is_file():
        lines += ["The step budget came from a timing probe run before any training: "
                  "[probe.md](probe.md).", ""]
    if not runs:
        (out / "README.md").write_text("\n".join(lines + ["No finished run yet.", ""]))
        return out / "README.md"
    first = next(iter(runs.values()))[0][0]
    lines += [f"Budget: {first['steps']} steps of windows of {first['context']} bytes; "
              f"{first['params']:,} parameters; test bpb on {first['test_bytes']:,} test bytes.", "",
              "| variant | seeds | test bpb (mean ± std) | per seed | val bpb | train bytes/s | "
              "generation bytes/s | cache bytes/token |",
              "|---|---|---|---|---|---|---|---|"]
    for variant, entries in runs.items():
        test = np.array([e["test_bpb"] for e, _ in entries])
        lines.append(
            f"| {variant} | {len(entries)} | {mean_std(test, 4)} "
            f"| {', '.join(f'{t:.4f}' for t in test)} "
            f"| {np.mean([e['val_bpb'] for e, _ in entries]):.4f} "
            f"| {np.median([e['train_tokens_per_s'] for e, _ in entries]):.0f} "
            f"| {np.median([e['generate_tokens_per_s'] for e, _ in entries]):.1f} "
            f"| {entries[0][0]['cache_bytes_per_token']:.0f} |")
    lines += ["", "Cache bytes per token: all layers, one sequence of the training context, fp32 "
              "(`causal.cache_bytes_per_token`); generation: batch of 3 prompts, "
              f"{GENERATED_BYTES} bytes each, through the decoding caches.", "",
              "Does BN or SH help a decoder here?", ""] + (_verdict(runs) or ["- (needs 2+ seeds)"])
    _plot(runs, out / "val_bpb.png")
    lines += ["", "![validation bits per byte](val_bpb.png)", "", "## Samples", "",
              f"Seed 0 of each variant, the first {PROMPT_BYTES} bytes of a test window as the prompt, "
              "temperature 0.8, top-40.", ""]
    for variant, entries in runs.items():
        sample = entries[0][0]["samples"][0]
        lines += [f"**{variant}**", "", "```", sample["prompt"] + " ⟶ " + sample["continuation"], "```", ""]
    machines = sorted({e.get("machine", "not recorded") for entries in runs.values() for e, _ in entries})
    lines += [f"Machine(s), recorded with the runs: {'; '.join(machines)}."]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out / "README.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("evaluate", help="write lm_eval.json in each run folder")
    run.add_argument("runs", nargs="+")
    run.add_argument("--threads", type=int, default=None)
    report = commands.add_parser("report", help="copy finished runs under --out and write its README")
    report.add_argument("--runs", default="runs/lm")
    report.add_argument("--out", default="results/lm")
    args = parser.parse_args(argv)
    if args.command == "evaluate":
        if args.threads:
            torch.set_num_threads(args.threads)
        for folder in args.runs:
            try:
                result = evaluate_run(folder)
            except (ValueError, FileNotFoundError) as error:  # one line, as pda's errors
                parser.error(str(error))
            print(f"{folder}: test {result['test_bpb']:.4f} bpb, {result['generate_tokens_per_s']:.1f} "
                  f"generated bytes/s")
        return 0
    try:
        collect(Path(args.runs), Path(args.out))
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {write_report(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
