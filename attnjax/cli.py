"""``python -m attnjax.train`` / ``attnjax-train``: parse the options, then train.

python -m attnjax.train                                  # AttentionNet + seed block on digits
python -m attnjax.train --block softmax --epochs 20 --workdir runs/softmax
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax

from attnjax import data, models, parallel, precision, train
from attnjax.config import Config
from attnjax.validate import InputError

CHOICES = {
    "model": models.names,
    "block": models.block_names,
    "augment": lambda: list(data.augment.CHOICES),
    "lr_schedule": lambda: list(train.SCHEDULES),
    "parallel": lambda: list(parallel.KINDS),
    "dtype": lambda: list(precision.DTYPES),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m attnjax.train",
        description="Train an attention CNN and report test accuracy after every epoch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", help=field.metadata["help"])
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
    parser.add_argument(
        "--workdir",
        default=None,
        help="folder for config.json and metrics.jsonl (one JSON line per epoch); "
        "default: a new folder runs/<dataset>-<model>-<block>-<time>. An existing run's results are never overwritten.",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, str]:
    args = vars(build_parser().parse_args(argv))
    workdir = args.pop("workdir")
    config = Config(**args)
    if workdir is None:
        dataset = config.dataset.replace(data.FOLDER_PREFIX, "").strip("/").replace("/", "_")
        workdir = f"runs/{dataset}-{config.model}-{config.block}-{time.strftime('%Y%m%d-%H%M%S')}"
    return config, workdir


def main(argv: list[str] | None = None) -> None:
    config, workdir = parse_args(argv)
    try:
        parallel.initialize_distributed(
            config.distributed, config.coordinator_address, config.num_processes, config.process_id
        )
        if jax.process_index() == 0:
            print(f"attnjax: {config.model} + {config.block} on {config.dataset}; writing to {workdir}", flush=True)
        train.train_and_evaluate(config, workdir)
    except (InputError, train.TrainingDiverged) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
