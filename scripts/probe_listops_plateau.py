"""Probe (issue 16): what decides how long ListOps stays at one class (embedding scale, lr, length)?

The 5,000-step ListOps runs stayed at the level of one class. The first suspect: the LRA
classifier draws its token embedding from PyTorch's default N(0, 1) beside a positional embedding
of std 0.02, where the published PyTorch LRA set-up (Nystromformer's) draws both from N(0, 0.02);
the probe also varies the learning rate and the expressions' length.

This probe trains the LRA classifier (softmax attention, dim 64, 2 layers, 2 heads, FFN 128,
dropout 0.1, masked mean) on *short* generated ListOps expressions (``--min-len`` < length <
``--max-len`` tokens; same generator, operators and depth as the LRA task) with each embedding
std in ``--stds`` and each seed in ``--seeds``, and prints validation accuracy every
``--every`` steps. Short expressions keep a run to a few CPU minutes; only the validation split
is read. The model is that of ``configs/lra/listops.yaml``; the schedule is the probe's own:
batch 32, AdamW, fp32, no length buckets, linear warm-up over the first 10 % of the steps (the
task's is 20 %), then linear decay to 0, cycling one fixed training set of ``--train-size``
expressions. The data always come from generator seed 0; ``--seeds`` varies the initialisation
and the batch order only.

Usage: PYTHONPATH=src python scripts/probe_listops_plateau.py --stds 1.0,0.02 --seeds 0,1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from primal_dual_attention.attention import AttentionConfig
from primal_dual_attention.data.lra import LISTOPS_VOCAB_SIZE, TokenSplit, generate_listops
from primal_dual_attention.models.lra import LRAClassifier
from primal_dual_attention.training.engine import evaluate


def splits(count: int, seed: int, min_len: int, max_len: int) -> tuple[TokenSplit, TokenSplit]:
    sequences, labels = generate_listops(count + 2000, seed, min_len=min_len, max_len=max_len)
    data = TokenSplit.from_sequences(sequences, labels, max_len)
    return data.subset(torch.arange(count)), data.subset(torch.arange(count, count + 2000))


def run(std: float, seed: int, train: TokenSplit, val: TokenSplit, args: argparse.Namespace) -> list[float]:
    torch.manual_seed(seed)
    model = LRAClassifier(LISTOPS_VOCAB_SIZE, 10, args.max_len, attention=AttentionConfig(variant="softmax"))
    torch.nn.init.normal_(model.embed.weight, std=std)
    with torch.no_grad():
        model.embed.weight[0].zero_()  # padding row, as nn.Embedding(padding_idx=0) keeps it
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (args.steps - s) / (args.steps - warmup))))
    generator = torch.Generator().manual_seed(seed)
    curve, step = [], 0
    while step < args.steps:
        for tokens, mask, labels in train.batches(32, generator):
            loss = F.cross_entropy(model(tokens, mask), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % args.every == 0:
                curve.append(evaluate(model, val, 256).accuracy)
                model.train()
            if step == args.steps:
                break
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stds", default="1.0,0.02")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--min-len", type=int, default=50)
    parser.add_argument("--max-len", type=int, default=300)
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, val = splits(args.train_size, 0, args.min_len, args.max_len)
    majority = np.bincount(val.labels.numpy(), minlength=10).max() / len(val)
    print(f"ListOps {args.min_len} < length < {args.max_len}: {len(train)} train, {len(val)} val, "
          f"majority class {majority:.3f}; batch 32, lr {args.lr}, {args.steps} steps, torch "
          f"{torch.__version__}, {args.threads} thread(s)")
    print("| embedding std | seed | " + " | ".join(f"val acc @ {s}" for s in
                                                   range(args.every, args.steps + 1, args.every)) + " | s |")
    print("|---|---|" + "---|" * (args.steps // args.every) + "---|")
    for std in (float(s) for s in args.stds.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            curve = run(std, seed, train, val, args)
            print(f"| {std:g} | {seed} | " + " | ".join(f"{a:.3f}" for a in curve)
                  + f" | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
