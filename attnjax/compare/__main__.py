"""``python -m attnjax.compare``: train every block with every seed under one recipe; write the study's summary.

See :mod:`attnjax.compare` for what it does and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from attnjax import compare as study
from attnjax import models, xla_options
from attnjax.train import Config, cli
from attnjax.train.exits import EXIT_DIVERGED, exit_on_failure
from attnjax.validate import CommandLineParser, InputError

MULTI_HOST = ("distributed", "coordinator_address", "num_processes", "process_id")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python -m attnjax.compare",
        description="Accuracy against cost for a set of attention blocks: every block trained with every seed under "
        "one recipe, cost measured on the host network, statistics over seeds, a Pareto plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--blocks",
        nargs="+",
        default=[study.ALL],
        metavar="BLOCK",
        help="the entries: block names (or comma lists), each optionally NAME:KEY=VALUE[:KEY=VALUE] with its "
        f"options; 'all' for every block; the baseline 'none' is always included. Names: "
        f"{', '.join(models.block_names())}",
    )
    parser.add_argument("--seeds", type=int, default=3, help="seeds per entry: --seed, --seed + 1, ...")
    parser.add_argument(
        "--cost-repeats", type=int, default=10, help="interleaved timed train steps per network (medians reported)"
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="the study's folder: runs/, cost.json, summary.*, runs.csv, pareto.png, curves.png; rerunning with the "
        "same folder continues the study (default: studies/<dataset>-<model>)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    # The study sets the block per run; it runs on one host, so the multi-host options are not offered.
    cli.add_config_arguments(parser, skip=("block", "block_option", *MULTI_HOST))
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        entries = study.parse_entries(args.pop("blocks"))
    except InputError as error:
        parser.error(str(error))
    seeds, repeats = args.pop("seeds"), args.pop("cost_repeats")
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds} (3 or more give confidence intervals)")
    if repeats < 1:
        parser.error(f"--cost-repeats must be >= 1, got {repeats}")
    workdir, progress = args.pop("workdir"), not args.pop("no_progress")
    for field in dataclasses.fields(Config):
        if field.type is tuple and field.name in args:
            args[field.name] = tuple(args[field.name] or ())
    base = Config(**args)
    if workdir is None:
        dataset = base.dataset.replace("folder:", "").strip("/").replace("/", "_")
        workdir = f"studies/{dataset}-{base.model}"
    return base, entries, [base.seed + i for i in range(seeds)], workdir, repeats, progress


def main(argv=None) -> None:
    base, entries, seeds, workdir, repeats, progress = parse_args(argv)
    command = "python -m attnjax.compare " + shlex.join(sys.argv[1:] if argv is None else argv)
    interrupted = (
        f"\nThe summary of the runs finished so far is in {workdir}; rerun the same command to continue the study."
    )
    aborted = (
        f"aborted by Ctrl-C; the finished runs and committed checkpoints in {workdir} are kept: rerun the same "
        "command to continue"
    )
    with exit_on_failure(interrupted_note=interrupted, aborted=aborted):
        xla_options.configure_xla_flags(base.xla_options)  # before JAX starts its backend: pmap reads XLA_FLAGS
        print(f"attnjax.compare: {len(entries)} entries, seeds {seeds}; writing to {workdir}", flush=True)
        outcome = study.run_study(base, entries, seeds, workdir, repeats=repeats, progress=progress, command=command)
    print(f"attnjax.compare: {outcome.finished} of {outcome.total} runs finished; summary in {workdir}/summary.md")
    for line in study.report.plain_words(outcome.rows, study.BASELINE):
        print("  " + line)
    if outcome.diverged:
        print("diverged (rerunning retries them; a lower --learning-rate may help):", file=sys.stderr)
        for line in outcome.diverged:
            print("  " + line, file=sys.stderr)
        sys.exit(EXIT_DIVERGED)


if __name__ == "__main__":
    main()
