"""The ``pda`` command: benchmarks, training, evaluation, the demo and sweeps."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from primal_dual_attention.attention import VARIANTS


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def _variants(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return names


def _bench_attention(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.bench import run_attention_benchmark, write_results

    results = run_attention_benchmark(sizes=args.sizes, variants=args.variants,
                                      repeats=args.repeats, memory=not args.no_memory)
    command = "pda " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    csv_path, md_path = write_results(results, Path(args.out), command)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pda", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    attn = bench_kinds.add_parser("attention", help="time, FLOPs and memory of one attention call")
    attn.add_argument("--sizes", type=_sizes, default=(256, 1024, 2048, 4096),
                      help="sequence lengths N, comma separated (default 256,1024,2048,4096)")
    attn.add_argument("--variants", type=_variants, default=tuple(VARIANTS),
                      help="variants, comma separated (default: all)")
    attn.add_argument("--repeats", type=int, default=7, help="timed runs per point (median)")
    attn.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    attn.add_argument("--out", default="results/bench", help="output folder")
    attn.set_defaults(func=_bench_attention)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
