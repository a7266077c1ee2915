"""The ``pda`` command: benchmarks, training, evaluation, the demo and sweeps."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TypeAlias

from primal_dual_attention.attention import PAPER_VARIANTS, STUDIED_VARIANTS, VARIANTS
from primal_dual_attention.training.config import PRECISIONS, PROTOCOLS, TrainConfig, canonical_task
from primal_dual_attention.utils import command_line, exclusive


def _dataset_epochs(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not name or not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected NAME=EPOCHS with EPOCHS >= 1, got {text!r}")
    return name, int(value)


def _int_tuple(text: str, lowest: int) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(values) < lowest:
        raise argparse.ArgumentTypeError(f"values must be >= {lowest}, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _device(text: str) -> str:
    """An argparse type: ``auto`` or a torch device string (whether it exists is checked later)."""
    from primal_dual_attention.training.config import check_device_name

    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _names_from(allowed: Sequence[str], what: str):
    """An argparse type: comma-separated names, each one of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(text.split(","))
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {what}(s) {unknown}; choose from {list(allowed)}")
        return names

    parse.__name__ = what
    return parse


def _yaml_value(text: str) -> object:
    """A YAML value; its syntax errors become one argument error."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = getattr(error, "problem", None) or "not valid YAML"
        raise argparse.ArgumentTypeError(f"not valid YAML ({reason}): {text!r}") from None


def _sizes(text: str) -> tuple[int, ...]:
    return _int_tuple(text, 1)


def _seeds(text: str) -> tuple[int, ...]:
    return _int_tuple(text, 0)


_variants = _names_from(tuple(VARIANTS), "variant")
_precisions = _names_from(PRECISIONS, "precision")


def _bench_attention(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.bench import run_attention_benchmark, write_results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before measuring: a bad --out must not cost the run
    results = run_attention_benchmark(sizes=args.sizes, variants=args.variants, repeats=args.repeats,
                                      memory=not args.no_memory,
                                      on_size=lambda done: write_results(done, out, args.command, True))
    csv_path, md_path = write_results(results, out, args.command)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return 0


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _int_list(text: str) -> list[int] | None:
    if text.lower() == "none":
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _mapping(text: str) -> dict | None:
    """A YAML mapping, e.g. ``'{pack_heads: true, eps: 1.0e-3}'``, or ``none``."""
    value = _yaml_value(text)
    if value is not None and not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{eps: 1.0e-3}}', got {text!r}")
    return value


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainConfig` field; unset options keep the config's value."""
    import typing

    from primal_dual_attention.attention import VARIANTS
    from primal_dual_attention.training.config import CHOICES, TrainConfig, config_fields
    from primal_dual_attention.training.tasks import task_names

    hints = typing.get_type_hints(TrainConfig)
    named = CHOICES | {"task": tuple(task_names()), "variant": tuple(VARIANTS)}
    parser.add_argument("--config", help="YAML file with any of the options below")
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        default = f.default
        if kind in (bool, bool | None):  # None: decided when the run starts (progress: a terminal)
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help="(default: on a terminal only)" if default is None
                                else f"(default {default})")
            continue
        parse = {int: int, float: float, str: str, int | None: _optional(int),
                 float | None: _optional(float), str | None: _optional(str),
                 list[int] | None: _int_list, dict[str, typing.Any] | None: _mapping}[kind]
        choices = f"one of {', '.join(named[f.name])} " if f.name in named else ""
        parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, metavar=f.name.upper(),
                            help=f"{choices}(default {default})")


def resolve_config(args: argparse.Namespace):
    """defaults < configs/<task>/<dataset>.yaml < --config file < command-line options."""
    from primal_dual_attention.training.config import (
        TrainConfig,
        bundled_config,
        config_from_mapping,
        load_yaml_config,
    )

    cli = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    from_file = load_yaml_config(args.config) if args.config else TrainConfig()
    task = cli.get("task", from_file.task)
    dataset = cli.get("dataset", from_file.dataset)
    cfg = bundled_config(task, dataset, TrainConfig())
    if args.config:
        cfg = load_yaml_config(args.config, cfg)
    return config_from_mapping(cli, "command line", cfg).validate()


def _train(args: argparse.Namespace) -> int:
    from primal_dual_attention.training.distributed import is_main_process
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    cfg = resolve_config(args).check_here()
    seed_everything(cfg.seed)
    task = build_task(cfg)
    say = print if is_main_process() else (lambda *_: None)
    say(task.description)
    note = protocol_note(cfg.protocol, task.val, cfg.max_eval_samples)
    say(f"variant={cfg.variant} protocol={cfg.protocol} ({note}) seed={cfg.seed}")
    result = fit(cfg, task)
    say(f"test accuracy {result.test_accuracy:.4f} (protocol {result.protocol}, best epoch "
          f"{result.best_epoch}/{result.epochs}); {result.params:,} parameters; "
          f"{result.epoch_seconds:.2f} s/epoch; {result.train_samples_per_second:.0f} samples/s; "
          f"run folder {result.run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    """The checkpoint's validation and test accuracy, on the samples, precision and length
    buckets its run used (``--all-samples``: the whole splits)."""
    import torch

    from primal_dual_attention.training.config import saved_config
    from primal_dual_attention.training.engine import (
        evaluate,
        load_checkpoint,
        load_weights,
        run_splits,
        seed_everything,
    )
    from primal_dual_attention.training.tasks import build_task

    state = load_checkpoint(args.checkpoint)
    overrides = ({"data_dir": args.data_dir} if args.data_dir else {}) | (
        {"data_file": args.data_file} if args.data_file else {}) | (
        {"max_eval_samples": None} if args.all_samples else {})
    cfg = saved_config(state["config"] | overrides, f"{args.checkpoint} config")
    seed_everything(cfg.seed)
    task = build_task(cfg)
    load_weights(task.model, state, args.checkpoint)
    _, _, val, test = run_splits(cfg, task, task.model, torch.device("cpu"))  # as the run evaluated
    print(task.description)
    done, inside = state["epoch"] + 1, state.get("round")  # a mid-round checkpoint: weights from inside
    where = f"step {inside['step']} of epoch {done + 1}" if inside else f"epoch {done}"
    print(f"checkpoint {args.checkpoint}: {where}, variant {cfg.variant}, precision "
          f"{cfg.precision}" + (f", {cfg.max_eval_samples} evaluation samples per split as in the run "
                                "(--all-samples: every one)" if cfg.max_eval_samples else ""))
    for name, split in (("val", val), ("test", test)):
        if split is not None and len(split):
            stats = evaluate(task.model, split, cfg.eval_batch_size, precision=cfg.precision)
            print(f"{name}: accuracy {stats.accuracy:.4f}, loss {stats.loss:.4f} ({stats.samples} targets)")
    return 0


PROTOCOL_NOTES = {"clean": "a held-out validation split chooses the epoch (UEA and CIFAR: val_fraction "
                           "of train, 20% by default; LRA and LM: their own); test read once",
                  "paper": "epoch chosen on the test split, optimistic (SPEC.md §4)"}


def protocol_note(protocol: str, validation: object, max_samples: int | None = None) -> str:
    """What chooses the epoch in this run: the validation samples it scores (of the split's
    size, when ``max_eval_samples`` draws fewer), or nothing."""
    if protocol != "clean":
        return PROTOCOL_NOTES[protocol]
    if validation is None or not len(validation):
        return "no validation split: the last epoch is kept; test read once"
    size = len(validation)
    if max_samples is None or max_samples >= size:
        return f"{size} held-out validation samples choose the epoch; test read once"
    return (f"{max_samples} of the {size} held-out validation samples (max_eval_samples) choose the epoch; "
            "test read once")


def _demo(args: argparse.Namespace) -> int:
    """Softmax, BN, SH and BN+SH on JapaneseVowels, one short budget each (protocol ``clean`` by
    default, SPEC.md §4)."""
    from primal_dual_attention.training.config import TrainConfig, dataset_config_path, load_yaml_config
    from primal_dual_attention.training.engine import fit, seed_everything
    from primal_dual_attention.training.tasks import build_task

    base = load_yaml_config(dataset_config_path("uea", "JapaneseVowels"), TrainConfig())
    rows = []
    for variant in PAPER_VARIANTS:
        cfg = TrainConfig(**{**base.to_dict(), "variant": variant, "epochs": args.epochs,
                             "protocol": args.protocol, "seed": args.seed, "out_dir": args.out,
                             "resume": True,  # a second demo reports its finished runs again
                             "data_dir": args.data_dir,
                             "progress": False if args.quiet else args.progress}).validate()
        seed_everything(cfg.seed)
        task = build_task(cfg)
        if not rows:
            print(task.description)
            print(f"{args.epochs} epochs per variant, protocol {args.protocol} "
                  f"({PROTOCOL_NOTES[args.protocol]}), seed {args.seed}\n")
        result = fit(cfg, task)
        rows.append((variant, result))
        print(f"  {variant:8} test accuracy {result.test_accuracy:.4f}  "
              f"({result.epoch_seconds:.2f} s/epoch)")
    print()
    print("| variant | test acc | best val epoch | s/epoch | train samples/s | parameters |")
    print("|---|---|---|---|---|---|")
    for variant, r in rows:
        print(f"| {variant} | {r.test_accuracy:.4f} | {r.best_epoch} | {r.epoch_seconds:.3f} | "
              f"{r.train_samples_per_second:.0f} | {r.params:,} |")
    return 0


def parse_override(text: str) -> tuple[str, object]:
    """One ``--set OPTION=VALUE`` as ``(option, value)``, the value read as YAML."""
    key, sep, value = text.partition("=")
    if not key or not sep:
        raise argparse.ArgumentTypeError(f"expected OPTION=VALUE (a pda train option), got {text!r}")
    return key.replace("-", "_"), _yaml_value(value)


SWEEP_DEFAULT_DATASETS = {"image": ("CIFAR10",)}


def _sweep(args: argparse.Namespace) -> int:
    """Run a sweep in its own folder (``--out``), record its command once it finished, and with
    ``--merge-into`` add its rows to a results folder (issue 15); ``--report-only`` rebuilds a
    results folder's README from its files alone."""
    from primal_dual_attention.analysis.task_report import write_task_report
    from primal_dual_attention.training.sweep import (
        changed_finished_runs,
        merge_results,
        plan_runs,
        plan_sweep,
        record_commands,
        run_key,
        run_sweep,
    )

    name = "cifar10" if args.task == "image" else args.task
    if args.report_only:
        results = Path(args.results or f"results/{name}")
        if not (results / "runs.csv").is_file():
            raise FileNotFoundError(f"--results {str(results)!r} holds no runs.csv to report on")
        print(f"wrote {write_task_report(args.task, results)}")
        return 0
    if args.results:
        raise ValueError(f"--results {args.results!r} names the folder --report-only rebuilds; a sweep "
                         "writes to its own --out folder and adds its rows to a results folder with "
                         "--merge-into")
    out = Path(args.out or f"runs/sweep/{name}")
    common = dict(seeds=args.seeds, epochs=args.epochs, overrides=dict(args.set),
                  epochs_per_dataset=dict(args.dataset_epochs), out_dir=str(out))
    runs = []
    if args.task == "uea":
        for table in ("main", "extended") if args.table == "all" else (args.table,):
            runs += plan_sweep(table, args.data_dir, datasets=args.datasets, variants=args.variants,
                               protocols=args.protocols or ("paper", "clean"), **common)
    else:
        datasets = args.datasets or SWEEP_DEFAULT_DATASETS.get(args.task, (args.task,))
        table = canonical_task(args.task, "")[0]  # lra-listops is table lra: one key per run
        runs = plan_runs(table, args.task, datasets, protocols=args.protocols or ("clean",),
                         variants=args.variants or PAPER_VARIANTS, data_dir=args.data_dir, **common)
    if not runs:
        raise ValueError("this sweep plans no run (the extended table runs the clean protocol only; "
                         "check --table, --protocols and --datasets)")
    runs[0][1].check_here()  # device and compile: one --set for every run
    named = {cfg.dataset for _, cfg in runs} | set(args.datasets or SWEEP_DEFAULT_DATASETS.get(args.task, ()))
    named |= {args.task} if args.task != "uea" else set()  # lra-listops names its dataset
    unplanned = sorted(set(common["epochs_per_dataset"]) - named)
    if unplanned:
        raise ValueError(f"--dataset-epochs names {unplanned}, which this sweep does not run")
    if args.merge_into:  # before any training: rows of other options would be dropped at the merge
        changed = changed_finished_runs(runs, Path(args.merge_into))
        if changed:
            raise ValueError(f"--merge-into {args.merge_into}: it holds these runs made with other options "
                             f"({'; '.join(changed[:3])}{'; ...' if len(changed) > 3 else ''}); merge into "
                             "another folder")
    run_sweep(runs, out, workers=args.workers, threads_per_worker=args.threads)
    record_commands(out, [args.command])  # only now: the command finished
    if args.merge_into:  # before any report, so that a report's failure cannot lose the merge
        target = Path(args.merge_into)
        added = merge_results(out, {run_key(table, cfg) for table, cfg in runs}, target, [args.command],
                              allow_mixed=args.allow_mixed)
        print(f"added {added} row(s) to {target / 'runs.csv'}")
    print(f"wrote {write_task_report(args.task, out)}")
    if args.merge_into:
        print(f"wrote {write_task_report(args.task, target)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.verify import run_verify

    return 0 if run_verify(args.checkpoint, args.data_dir, args.out) else 1


def _heads(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.redundancy import heads_report

    heads_report(args.checkpoints, args.out, samples=args.samples, layer=args.layer,
                 data_dir=args.data_dir, command=args.command)
    print(f"wrote {args.out}/redundancy.csv, redundancy.png and maps.png")
    return 0


def _bench_precision(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.precision import precision_check

    rows = precision_check(args.device, args.precisions, batch=args.batch, num_tokens=args.tokens,
                           dim=args.dim, heads=args.heads, repeats=args.repeats, compile_model=args.compile)
    return 0 if all(r["finite"] for r in rows) else 1


def _bench_scaling(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.scaling import run_scaling, write_scaling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # before measuring: a bad --out must not cost the run
    heads, head_dim = 8, 32
    points = run_scaling(args.sizes, args.variants, batch=args.batch, heads=heads, head_dim=head_dim,
                         repeats=args.repeats, time_limit_s=args.time_limit, memory=not args.no_memory,
                         on_size=lambda done: write_scaling(done, out, args.command, args.batch, heads,
                                                            head_dim, partial=True))
    path = write_scaling(points, out, args.command, args.batch, heads, head_dim)
    print(path.read_text())
    return 0


def _bench_model(args: argparse.Namespace) -> int:
    import torch

    from primal_dual_attention.analysis.model_cost import (
        check_cost_folder,
        cpu_load,
        measure_model_costs,
        variant_configs,
        write_costs,
        write_speed_table,
    )
    from primal_dual_attention.training.config import TrainConfig, bundled_config, config_from_mapping

    if ignored := sorted(set(dict(args.set)) & {"compile", "device"}):
        raise ValueError(f"bench model --set {ignored[0]}: not a model option here; use "
                         f"{'--modes' if ignored[0] == 'compile' else '--device'}")
    base = bundled_config(args.task, args.dataset, TrainConfig(task=args.task, dataset=args.dataset))
    base = config_from_mapping(dict(args.set), "bench --set", base)
    cfgs = variant_configs(base, args.variants)
    out = Path(args.out)
    check_cost_folder(out)  # before measuring: a folder it cannot write must not cost the run
    if base.threads:  # `--set threads=N`, as `pda train` takes it
        torch.set_num_threads(base.threads)
    if (load := cpu_load()) is not None and load >= 1.0:
        warnings.warn(f"load average {load:.1f} before the bench: other processes use the CPU, so its "
                      "timings are contended (the load is written beside the command)", stacklevel=1)
    costs = measure_model_costs(cfgs, batch=args.batch, repeats=args.repeats, device=args.device,
                                modes=args.modes, memory=not args.no_memory, timing_lock=args.timing_lock)
    for cost in costs:
        ratio = "" if cost.train_ratio is None else f" ({cost.train_ratio:.2f}x softmax)"
        flops = "" if cost.flop_ratio is None else f" ({cost.flop_ratio:.2f}x)"
        print(f"{cost.mode:10} {cost.variant:12} train {cost.train_ms:8.2f} ms/step{ratio} "
              f"{cost.train_samples_per_s:10.1f} train/s {cost.infer_samples_per_s:10.1f} infer/s "
              f"{cost.gflops_fwd_per_sample:8.3f} GFLOPs fwd/sample{flops}  peak "
              f"{cost.peak_train_mb if cost.peak_train_mb is None else round(cost.peak_train_mb)} MiB")
    with exclusive(args.timing_lock):  # processes sharing the lock may share the folder
        print(f"wrote {write_costs(costs, out, args.command, load)} and {write_speed_table(out)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from primal_dual_attention.analysis.report import write_report

    print(f"wrote {write_report(args.results)}")
    return 0


#: what ``add_subparsers`` returns: each ``_add_*`` function adds one subcommand to it
Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _add_bench_attention(kinds: Commands) -> None:
    attn = kinds.add_parser("attention", help="time, FLOPs and memory of one attention call")
    attn.add_argument("--sizes", type=_sizes, default=(256, 1024, 2048, 4096),
                      help="sequence lengths N, comma separated (default 256,1024,2048,4096)")
    attn.add_argument("--variants", type=_variants, default=tuple(VARIANTS),
                      help="variants, comma separated (default: all)")
    attn.add_argument("--repeats", type=_positive_int, default=7, help="timed runs per point (median)")
    attn.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    attn.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    attn.set_defaults(func=_bench_attention)


def _add_bench_scaling(kinds: Commands) -> None:
    scaling = kinds.add_parser("scaling", help="one attention layer per variant as N grows")
    scaling.add_argument("--sizes", type=_sizes, default=(256, 512, 1024, 2048, 4096, 8192))
    scaling.add_argument("--variants", type=_variants, default=STUDIED_VARIANTS)
    scaling.add_argument("--batch", type=_positive_int, default=2)
    scaling.add_argument("--repeats", type=_positive_int, default=3)
    scaling.add_argument("--time-limit", type=_positive_float, default=4.0,
                         help="stop a variant once one forward+backward call takes longer (s)")
    scaling.add_argument("--no-memory", action="store_true")
    scaling.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    scaling.set_defaults(func=_bench_scaling)


def _add_bench_precision(kinds: Commands) -> None:
    precision = kinds.add_parser("precision", help="bf16/fp16 autocast vs fp32 per variant")
    precision.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda[:i]")
    precision.add_argument("--precisions", type=_precisions, default=("fp32", "bf16"),
                           help="comma separated: fp32,bf16,fp16 (default fp32,bf16)")
    precision.add_argument("--tokens", type=_positive_int, default=1024, help="sequence length")
    precision.add_argument("--batch", type=_positive_int, default=8)
    precision.add_argument("--dim", type=_positive_int, default=256, help="width, divisible by --heads")
    precision.add_argument("--heads", type=_positive_int, default=8)
    precision.add_argument("--repeats", type=_positive_int, default=5, help="timed rounds (median)")
    precision.add_argument("--compile", action="store_true", help="run the layer through torch.compile")
    precision.set_defaults(func=_bench_precision)


def _add_bench_model(kinds: Commands) -> None:
    model = kinds.add_parser("model", help="a task model's throughput, FLOPs and memory per variant")
    model.add_argument("--task", default="image",
                       help="image (default), uea, lra (with --dataset) or lra-<dataset>")
    model.add_argument("--dataset", default="CIFAR10")
    model.add_argument("--variants", type=_variants, default=PAPER_VARIANTS)
    model.add_argument("--batch", type=_positive_int, default=128)
    model.add_argument("--repeats", type=_positive_int, default=10, help="timed rounds (median per variant)")
    model.add_argument("--modes", type=lambda t: tuple(t.split(",")), default=("eager",),
                       help="comma separated: eager, compile (torch.compile), cudagraphs "
                            "(torch.compile mode reduce-overhead); default eager")
    model.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    model.add_argument("--timing-lock", metavar="FILE",
                       help="time (and write) while holding an exclusive lock on FILE: processes "
                            "started together then compile at once and use the device one at a time")
    model.add_argument("--device", type=_device, default="auto", help="auto, cpu or cuda[:i]")
    model.add_argument("--set", type=parse_override, action="append", default=[], metavar="OPTION=VALUE",
                       help="a pda train option of the model, e.g. --set precision=bf16 (repeatable; "
                            "compile_backend is the backend of --modes compile; window is the sparse "
                            "variants' own, the others run without one)")
    model.add_argument("--out", default="runs/bench_model",
                       help="folder of cost.csv and speed.md (default runs/bench_model)")
    model.set_defaults(func=_bench_model)


def _add_bench(commands: Commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="kind", required=True)
    for add in (_add_bench_attention, _add_bench_scaling, _add_bench_precision, _add_bench_model):
        add(kinds)


def _add_train(commands: Commands) -> None:
    train = commands.add_parser("train", help="train one model (options also from --config YAML)")
    _add_config_options(train)
    train.set_defaults(func=_train)


def _add_eval(commands: Commands) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint on its validation/test split")
    evaluate.add_argument("checkpoint", help="a last.pt or best.pt written by pda train")
    evaluate.add_argument("--data-dir", help="where the data is now, if it moved")
    evaluate.add_argument("--data-file", help="where an LM run's --data-file is now (a relative path is "
                                              "read from the current folder)")
    evaluate.add_argument("--all-samples", action="store_true",
                          help="every validation and test sample, not the run's max_eval_samples draw")
    evaluate.set_defaults(func=_eval)


def _add_demo(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="softmax vs BN vs SH vs BN+SH on JapaneseVowels")
    demo.add_argument("--epochs", type=_positive_int, default=60, help="epochs per variant (default 60)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--protocol", choices=PROTOCOLS, default=TrainConfig.protocol,
                      help=(f"default {TrainConfig.protocol}: {PROTOCOL_NOTES['clean']}; paper: "
                            f"{PROTOCOL_NOTES['paper']}").replace("%", "%%"))  # argparse formats help
    demo.add_argument("--data-dir", default=None, help="UEA folder (default: ../shared/data/uea or aeon)")
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--progress", action="store_const", const=True, default=None,
                      help="progress bars even when the output is not a terminal (default: on a "
                           "terminal only)")
    demo.set_defaults(func=_demo)


def _add_sweep(commands: Commands) -> None:
    sweep = commands.add_parser("sweep", help="resumable sweeps (UEA tables, CIFAR-10, LRA) and reports")
    sweep.add_argument("--task", default="uea",
                       help="uea (default), image, lra (its datasets from --datasets) or lra-<dataset>")
    sweep.add_argument("--table", choices=("main", "extended", "all"), default="main",
                       help="UEA only: which table")
    sweep.add_argument("--data-dir", default=None, help="data folder (default: ../shared/data/...)")
    sweep.add_argument("--datasets", type=lambda t: t.split(","), default=None,
                       help="comma-separated subset (default: every dataset found)")
    sweep.add_argument("--variants", type=_variants, default=None,
                       help="default: the UEA table's, else softmax,bn,sh,bn_sh")
    sweep.add_argument("--protocols", type=lambda t: tuple(t.split(",")), default=None,
                       help="default: paper,clean for UEA main, clean otherwise")
    sweep.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="default 0,1,2")
    sweep.add_argument("--epochs", type=_positive_int, default=None, help="override every config's epochs")
    sweep.add_argument("--dataset-epochs", type=_dataset_epochs, action="append", default=[],
                       metavar="NAME=EPOCHS", help="epochs for one dataset (repeatable)")
    sweep.add_argument("--set", type=parse_override, action="append", default=[], metavar="OPTION=VALUE",
                       help="any pda train option for every run, e.g. --set precision=bf16 (repeatable)")
    sweep.add_argument("--workers", type=_positive_int, default=1, help="parallel training processes")
    sweep.add_argument("--threads", type=_positive_int, default=1, help="torch threads per worker")
    sweep.add_argument("--out", default=None,
                       help="the sweep's own folder: run folders, runs.csv, logs, sweep_commands.txt, "
                            "README.md (default runs/sweep/uea, runs/sweep/cifar10, ...)")
    sweep.add_argument("--merge-into", default=None, metavar="RESULTS",
                       help="once the sweep finished, append its rows, logs and command to this results "
                            "folder (e.g. results/uea) and rebuild its README; rows already there are kept")
    sweep.add_argument("--allow-mixed", action="store_true",
                       help="with --merge-into: also add rows of a table the folder lacks, or of a "
                            "dataset it holds with another budget (epochs, budget)")
    sweep.add_argument("--report-only", action="store_true",
                       help="only rebuild README.md of --results from its runs.csv, logs and costs")
    sweep.add_argument("--results", default=None,
                       help="with --report-only: the results folder (default results/uea, "
                            "results/cifar10, ...)")
    sweep.set_defaults(func=_sweep)


def _add_verify(commands: Commands) -> None:
    verify = commands.add_parser("verify", help="check attention == SVR expansion, primal == dual")
    verify.add_argument("--checkpoint", default=None, help="take keys/values from this model")
    verify.add_argument("--data-dir", default=None, help="UEA folder for the real-data rows")
    verify.add_argument("--out", default="runs/verify", help="output folder (default runs/verify)")
    verify.set_defaults(func=_verify)


def _add_heads(commands: Commands) -> None:
    heads = commands.add_parser("heads", help="head redundancy (js, cos_maps, cos_out) per layer")
    heads.add_argument("checkpoints", nargs="+", help="checkpoints to compare side by side")
    heads.add_argument("--samples", type=_positive_int, default=256,
                       help="test series evaluated (default 256)")
    heads.add_argument("--layer", type=_positive_int, default=1,
                       help="layer whose maps are drawn (1 = first)")
    heads.add_argument("--data-dir", default=None)
    heads.add_argument("--out", default="runs/heads", help="output folder (default runs/heads)")
    heads.set_defaults(func=_heads)


def _add_report(commands: Commands) -> None:
    report = commands.add_parser("report", help="gather results/ into results/README.md")
    report.add_argument("--results", default="results", help="results folder")
    report.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``pda`` parser: one function adds each subcommand, in the order ``--help`` lists them."""
    parser = argparse.ArgumentParser(prog="pda", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_bench, _add_train, _add_eval, _add_demo, _add_sweep, _add_verify, _add_heads,
                _add_report):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; a bad option or input (non-finite training data included) prints
    ``pda: error: ...`` and exits with 2; a warning prints as one ``pda: warning: ...`` line."""
    args = build_parser().parse_args(argv)
    args.command = command_line(argv)  # as typed, for the records that name it
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"pda: warning: {message}\n"
    try:
        return args.func(args)
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"pda: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    raise SystemExit(main())
