"""``python -m attnjax.train`` / ``attnjax-train``: parse the options, then train.

python -m attnjax.train                                  # AttentionNet + seed block on digits
python -m attnjax.train --block softmax --epochs 20 --workdir runs/softmax
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax

from attnjax import data, xla_options
from attnjax.train import parallel
from attnjax.train.config import Config, check_config_fields, recorded_config
from attnjax.train.exits import exit_on_failure
from attnjax.train.loop import train_and_evaluate
from attnjax.train.recipe import CHOICES, check_config
from attnjax.validate import CommandLineParser, InputError


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
    parser = CommandLineParser(
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


# The keys a run's config.json holds beside "config" (Workdir.write_config: Recipe.run_description).
# Three of them share an option's name; in a run's file they are what the run resolved, not options.
RUN_KEYS = (
    "registry",
    "augment",
    "devices",
    "processes",
    "jax",
    "dataset",
    "xla_options",
    "formulations",
    "pretrained",
)


def load_config_file(path: str) -> dict:
    """The option values in ``path``, type-checked: a run's ``config.json`` (its ``config``) or a flat JSON object.

    A ``config`` object makes the file a run's; options beside it would be ambiguous (which one
    wins?), so they are refused rather than one silently dropped.
    """
    try:
        with open(path) as file:
            data = json.load(file)
    except (OSError, ValueError) as error:
        raise InputError(
            f"--config {path} cannot be read ({error}); give a run's config.json or a JSON object"
        ) from None
    if not isinstance(data, dict):
        raise InputError(f'--config {path} holds no JSON object of options, such as {{"block": "se"}}')
    fields = data
    if "config" in data:
        if not isinstance(data["config"], dict):
            raise InputError(
                f'--config {path}: "config" is {json.dumps(data["config"])[:60]}, not an object; a run\'s '
                "config.json holds its options there, a file written by hand holds them at the top level"
            )
        options = {field.name for field in dataclasses.fields(Config)}
        beside = sorted((set(data) & options) - set(RUN_KEYS))
        if beside:
            raise InputError(
                f'--config {path} has both a "config" object (a run\'s options) and option(s) {", ".join(beside)} '
                "beside it; give either a run's config.json or one flat object of options"
            )
        fields = recorded_config(data)  # a run's config.json: in today's model names
    return check_config_fields(fields, f"--config {path}")


def parse_args(argv: list[str] | None = None) -> tuple[Config, str, bool]:
    """The config, the workdir and whether to continue a run found there.

    With ``--config FILE`` the file's values (type-checked: :func:`load_config_file`) replace the
    defaults, and the options given on the command line replace the file's.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    from_file = {}
    if args.config:
        with exit_on_failure():  # one line, like check_config's: the usage would bury it
            from_file = load_config_file(args.config)
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


def main(argv: list[str] | None = None) -> None:
    config, workdir, resume = parse_args(argv)
    with exit_on_failure():
        check_config(config)  # every option, before JAX starts a backend or a multi-host runtime
        xla_options.configure_xla_flags(config.xla_options)
        parallel.initialize_distributed(
            config.distributed, config.coordinator_address, config.num_processes, config.process_id
        )
        if jax.process_index() == 0:
            print(f"attnjax: {config.model} + {config.block} on {config.dataset}; writing to {workdir}", flush=True)
        train_and_evaluate(config, workdir, resume=resume)


if __name__ == "__main__":
    main()
