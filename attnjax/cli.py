"""``python -m attnjax.train`` / ``attnjax-train``: parse the options, then train.

python -m attnjax.train                                  # AttentionNet + seed block on digits
python -m attnjax.train --block softmax --epochs 20 --workdir runs/softmax
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax

from attnjax import data, models, optim, parallel, precision, train, xla_options
from attnjax.checkpoint import CheckpointError
from attnjax.config import Config
from attnjax.preemption import Interrupted
from attnjax.validate import InputError

CHOICES = {
    "model": models.names,
    "block": models.block_names,
    "augment": lambda: list(data.augment.CHOICES),
    "lr_schedule": lambda: list(train.SCHEDULES),
    "optimizer": lambda: list(optim.OPTIMIZERS),
    "parallel": lambda: list(parallel.KINDS),
    "dtype": lambda: list(precision.DTYPES),
    "xla_options": lambda: list(xla_options.MODES),
}


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--field-name`` option per :class:`Config` field (except those in ``skip``), with its help and default.

    Repeatable fields (tuples) default to ``None``, meaning "not given" (see :func:`parse_args`).
    """
    for field in dataclasses.fields(Config):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", help=field.metadata["help"])
            continue
        if field.type is tuple:  # repeatable KEY=VALUE options; None: not given (a --config file's value stands)
            parser.add_argument(flag, action="append", default=None, help=field.metadata["help"], metavar="KEY=VALUE")
            continue
        choices = CHOICES[field.name]() if field.name in CHOICES else None
        help_text = field.metadata["help"] + (f"; one of: {', '.join(choices)}" if choices else "")
        parser.add_argument(
            flag,
            type=field.metadata["parse"] or field.type,
            default=field.default,
            choices=choices,
            help=help_text,
            metavar=field.name.upper(),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m attnjax.train",
        description="Train an attention CNN and report test accuracy after every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from the options in FILE: a run's config.json (to replay it: the same metrics.jsonl, timing "
        "aside) or a JSON object of option names and values; options given on the command line override it",
    )
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="refuse a --workdir that already holds a run, instead of continuing it from its latest checkpoint",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for config.json and metrics.jsonl (one JSON line per epoch); "
        "default: a new folder runs/<dataset>-<model>-<block>-<time>. An existing run's results are never overwritten.",
    )
    return parser


def load_config_file(path: str) -> dict:
    """The option values in ``path``: a run's ``config.json`` (its ``config`` object) or a flat JSON object."""
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--config {path} cannot be read ({error}); give a run's config.json or a JSON object"
        ) from None
    fields = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        raise InputError(f'--config {path} holds no JSON object of options, such as {{"block": "se"}}')
    known = [field.name for field in dataclasses.fields(Config)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise InputError(f"--config {path}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return fields


def parse_args(argv: list[str] | None = None) -> tuple[Config, str, bool]:
    """The config, the workdir and whether to continue a run found there.

    With ``--config FILE`` the file's values replace the defaults, and the options given on the
    command line replace the file's.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from_file = {}
    if args.config:
        try:
            from_file = load_config_file(args.config)
        except InputError as error:
            parser.error(str(error))
        repeatable = {field.name for field in dataclasses.fields(Config) if field.type is tuple}
        parser.set_defaults(**{k: v for k, v in from_file.items() if k not in repeatable})
        args = parser.parse_args(argv)
    args = vars(args)
    workdir, resume = args.pop("workdir"), not args.pop("no_resume")
    args.pop("config")
    for field in dataclasses.fields(Config):
        if field.type is tuple:  # a repeatable option: the command line's values, else the file's, else none
            given = args[field.name]
            args[field.name] = tuple(from_file.get(field.name, ()) if given is None else given)
    config = Config(**args)
    if workdir is None:
        dataset = config.dataset.replace(data.FOLDER_PREFIX, "").strip("/").replace("/", "_")
        workdir = f"runs/{dataset}-{config.model}-{config.block}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, workdir, resume


# Exit statuses: a script or scheduler can tell a mistake from a divergence from an interruption.
EXIT_BAD_INPUT = 2  # an option, a workdir or a file is wrong: the message says which and what works
EXIT_DIVERGED = 3  # the loss or a gradient stopped being finite
EXIT_CHECKPOINT = 4  # a checkpoint could not be written or read
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after saving; rerun the same command to continue
EXIT_ABORTED = 130  # Ctrl-C before training started, or twice: nothing new was saved


def configure_xla_flags(mode: str = "tuned") -> None:
    """Add attnjax's XLA:CPU options to ``XLA_FLAGS`` (the user's own settings win), if no backend started yet.

    ``jax.pmap`` takes no compiler options: ``XLA_FLAGS``, read when JAX starts its backend, is
    its only route. Only entry points call this; importing attnjax never touches the environment.
    """
    if not xla_options.backend_started():
        os.environ["XLA_FLAGS"] = xla_options.merge_xla_flags(os.environ.get("XLA_FLAGS", ""), mode)


def main(argv: list[str] | None = None) -> None:
    config, workdir, resume = parse_args(argv)
    failures = (
        (InputError, EXIT_BAD_INPUT),
        (train.TrainingDiverged, EXIT_DIVERGED),
        (CheckpointError, EXIT_CHECKPOINT),
        (Interrupted, EXIT_INTERRUPTED),
    )
    try:
        train.check_config(config)  # every option, before JAX starts a backend or a multi-host runtime
        configure_xla_flags(config.xla_options)
        parallel.initialize_distributed(
            config.distributed, config.coordinator_address, config.num_processes, config.process_id
        )
        if jax.process_index() == 0:
            print(f"attnjax: {config.model} + {config.block} on {config.dataset}; writing to {workdir}", flush=True)
        train.train_and_evaluate(config, workdir, resume=resume)
    except tuple(kind for kind, _ in failures) as error:
        status = next(code for kind, code in failures if isinstance(error, kind))
        print(f"{'stopped' if status == EXIT_INTERRUPTED else 'error'}: {error}", file=sys.stderr, flush=True)
        sys.exit(status)
    except KeyboardInterrupt:
        print("aborted by Ctrl-C; the checkpoints already committed are kept", file=sys.stderr, flush=True)
        sys.exit(EXIT_ABORTED)


if __name__ == "__main__":
    main()
