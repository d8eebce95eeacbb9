"""A study of attention blocks under one recipe: accuracy over seeds against cost, ``python -m attnjax.compare``.

    python -m attnjax.compare --blocks all --seeds 3 --dataset fashion_mnist --epochs 2 --workdir studies/fmnist
    python -m attnjax.compare --blocks none se cbam:reduction=8:kernel_size=5 --seeds 5

Each entry of ``--blocks`` (a block name, optionally with ``:KEY=VALUE`` options; ``none`` for
the baseline, which is always included; ``all`` for every registered block) is trained with
each seed as an ordinary run of :func:`attnjax.train.train_and_evaluate` in its own workdir,
``WORKDIR/runs/<entry>/seed-<s>``, so every run can be inspected (``metrics.jsonl``,
``python -m attnjax.viz``) and resumed. Every other training option is passed to every run
unchanged, and the runs of one seed share their data order and augmentation: the runs are
paired by seed.

Rerunning the same command skips the finished runs and resumes an interrupted one from its
checkpoint, so a long study survives interruption; a run whose options differ from the
command's is refused before any work. The cost of each entry on the host network
(:mod:`attnjax.compare.cost`) is measured once, side by side, and kept in ``cost.json``.

At the end (and on an interruption, for the runs finished so far) the study writes
``summary.csv``, ``summary.md``, ``runs.csv`` (every run's final metrics), ``pareto.png`` and
``curves.png`` (see :mod:`attnjax.compare.report` and :mod:`attnjax.compare.stats`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Sequence

import jax
from tqdm.auto import tqdm

from attnjax import blocks, data, models, train
from attnjax.compare import cost, plots, report
from attnjax.train import Config, Interrupted, Preemption, checkpoint
from attnjax.train.workdir import check_path_characters
from attnjax.validate import InputError

BASELINE = models.NO_BLOCK
ALL = "all"
RUNS_DIR = "runs"
STUDY_FILE = "study.json"
COST_FILE = "cost.json"
SUMMARY_CSV, SUMMARY_MD, RUNS_CSV = "summary.csv", "summary.md", "runs.csv"
PARETO_PNG, CURVES_PNG = "pareto.png", "curves.png"
# The options a study sets per run; every other Config field is the study's, the same for every run.
PER_RUN_FIELDS = ("block", "block_option", "seed")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of the study: a block (or the baseline) with its options."""

    block: str
    options: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return ":".join((self.block, *self.options))

    @property
    def dirname(self) -> str:
        """The label as a folder name: ``cbam:reduction=8`` -> ``cbam+reduction-8``."""
        return self.label.replace(":", "+").replace("=", "-").replace(",", "_").replace("/", "_")


def parse_entries(items: Sequence[str]) -> list[Entry]:
    """``--blocks`` items as entries, the baseline first (added if absent), each block's options checked.

    An item is ``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]``; an item without options may be a
    comma-separated list of names; ``all`` is every registered block.
    """
    pieces: list[str] = []
    for item in items:
        if ":" in item:
            pieces.append(item.strip())
        else:
            pieces.extend(name.strip() for name in item.split(",") if name.strip())
    if not pieces:
        raise InputError(f"--blocks names no block; give block names (valid: {', '.join(models.block_names())}) or all")
    entries: list[Entry] = []
    for piece in pieces:
        if piece == ALL:
            entries.extend(Entry(name) for name in models.block_names())
            continue
        name, *pairs = piece.split(":")
        if name not in models.block_names():
            raise InputError(
                f"--blocks: unknown block {name!r} in {piece!r}; valid names: {', '.join(models.block_names())}, all"
            )
        if pairs and name == BASELINE:
            raise InputError(f"--blocks: {piece!r}: the baseline 'none' has no options")
        if pairs:
            blocks.parse_options(name, pairs)  # raises with the block's valid options
        entries.append(Entry(name, tuple(pairs)))
    unique = list(dict.fromkeys(entries))  # `all` and a name may repeat an entry: keep the first
    baseline = Entry(BASELINE)
    return [baseline, *(e for e in unique if e != baseline)]


def run_config(base: Config, entry: Entry, seed: int) -> Config:
    return dataclasses.replace(base, block=entry.block, block_option=entry.options, seed=seed)


def run_dir(workdir: str, entry: Entry, seed: int) -> str:
    return os.path.join(workdir, RUNS_DIR, entry.dirname, f"seed-{seed}")


def read_history(rundir: str) -> list[dict]:
    """The per-epoch records of a run's ``metrics.jsonl`` (empty if there is none yet)."""
    path = os.path.join(rundir, train.METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


def check_runs(base: Config, entries: Sequence[Entry], seeds: Sequence[int], workdir: str) -> None:
    """Refuse, before any work, a run folder that holds a run with options other than the study's."""
    for entry in entries:
        for seed in seeds:
            rundir = run_dir(workdir, entry, seed)
            saved = train.read_config(rundir)
            diff = run_config(base, entry, seed).trajectory_diff(saved) if saved is not None else []
            if diff:
                raise InputError(
                    f"{rundir} holds a run with other options than this study's:\n  "
                    + "\n  ".join(diff)
                    + "\nRerun the study with its original options to continue it, or pass a new --workdir."
                )


def is_finished(config: Config, rundir: str) -> bool:
    return len(read_history(rundir)) >= config.epochs


@dataclasses.dataclass
class Outcome:
    """What a study call ended with: the finished runs, the runs that diverged, and where the summary went."""

    finished: int
    total: int
    diverged: list[str]
    rows: list[report.Row]


def load_costs(
    workdir: str,
    base: Config,
    entries: Sequence[Entry],
    dataset: data.Dataset,
    repeats: int,
    progress: bool,
    say=print,
) -> dict[str, cost.NetworkCost]:
    """The entries' network costs: from ``cost.json`` if measured for the same entries and input, else measured now."""
    key = {
        "labels": [e.label for e in entries],
        "model": base.model,
        "model_option": list(base.model_option),
        "image_shape": list(dataset.image_shape),
        "batch_size": base.batch_size,
        "dtype": base.dtype,
        "optimizer": base.optimizer,
        "xla_options": base.xla_options,
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    path = os.path.join(workdir, COST_FILE)
    if os.path.exists(path):
        with open(path) as file:
            saved = json.load(file)
        if saved.get("key") == key:
            return {label: cost.NetworkCost.from_dict(record) for label, record in saved["costs"].items()}
        say("attnjax.compare: the entries or the input changed since cost.json was measured: measuring again")
    say(f"attnjax.compare: measuring the cost of {len(entries)} networks side by side ({repeats} rounds)", flush=True)
    configs = {e.label: run_config(base, e, base.seed) for e in entries}
    costs = cost.measure(configs, dataset.image_shape, dataset.num_classes, repeats=repeats, progress=progress)
    record = {
        "key": key,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}",
        "costs": {label: c.to_dict() for label, c in costs.items()},
    }
    checkpoint.write_atomically(path, json.dumps(record, indent=2))
    return costs


def collect(entries: Sequence[Entry], seeds: Sequence[int], base: Config, workdir: str):
    """Every run's final metrics (finished runs only), the final accuracies per entry and seed, and mean curves."""
    records, finals, curves = [], {}, {}
    for entry in entries:
        histories = {}
        for seed in seeds:
            rundir = run_dir(workdir, entry, seed)
            history = read_history(rundir)
            done = len(history) >= base.epochs
            last = history[-1] if history else {}
            records.append(
                {
                    "block": entry.label,
                    "seed": seed,
                    "status": "finished" if done else ("partial" if history else "not run"),
                    "epochs": len(history),
                    "test_accuracy": last.get("test_accuracy", ""),
                    "test_correct": last.get("test_correct", ""),
                    "test_examples": last.get("test_examples", ""),
                    "test_loss": last.get("test_loss", ""),
                    "train_loss": last.get("train_loss", ""),
                    "train_accuracy": last.get("train_accuracy", ""),
                    "train_seconds": sum(r.get("epoch_seconds", 0.0) for r in history) or "",
                    "workdir": os.path.relpath(rundir, workdir),
                }
            )
            if done:
                histories[seed] = history[: base.epochs]
        finals[entry.label] = {seed: h[-1]["test_accuracy"] for seed, h in histories.items()}
        if histories:
            curves[entry.label] = [
                sum(h[e]["test_accuracy"] for h in histories.values()) / len(histories) for e in range(base.epochs)
            ]
    return records, finals, curves


RUN_COLUMNS = (
    "block",
    "seed",
    "status",
    "epochs",
    "test_accuracy",
    "test_correct",
    "test_examples",
    "test_loss",
    "train_loss",
    "train_accuracy",
    "train_seconds",
    "workdir",
)


def write_outputs(
    workdir: str,
    base: Config,
    entries: Sequence[Entry],
    seeds: Sequence[int],
    costs: dict[str, cost.NetworkCost],
    command: str = "",
) -> list[report.Row]:
    """``runs.csv``, ``summary.csv``, ``summary.md``, ``pareto.png`` and ``curves.png`` of the runs finished so far."""
    records, finals, curves = collect(entries, seeds, base, workdir)
    labels = [e.label for e in entries]
    rows = report.summarize(labels, BASELINE, costs, finals)
    report.write_csv(os.path.join(workdir, RUNS_CSV), records, RUN_COLUMNS)
    report.write_csv(os.path.join(workdir, SUMMARY_CSV), [report.row_values(r) for r in rows], report.CSV_COLUMNS)
    finished = sum(r["status"] == "finished" for r in records)
    title = f"{base.model} on {base.dataset}, {base.epochs} epoch(s), seeds {seeds[0]}..{seeds[-1]}"
    text = [
        f"# Study: {title}",
        "",
        f"{finished} of {len(records)} runs finished. Command: `{command}`"
        if command
        else f"{finished} runs finished.",
        "",
        report.markdown_table(rows),
        "",
        "Test accuracy: the final epoch's, mean over seeds with Student's t 95% interval (clipped to [0, 100]). "
        "Δ: paired by seed (block minus none, same data order), with its t interval (clipped to ±100); "
        "p: paired t test, Holm-corrected over the blocks compared. Verdict 'within noise' unless that p < 0.05. "
        "Cost: one train step at the run's batch on one device; time is the median of interleaved repeats, "
        "relative to none's; temp MiB: XLA's temporary buffers of the step. "
        "◆: on the Pareto front of mean accuracy against step time.",
        "",
        *report.plain_words(rows, BASELINE),
        "",
    ]
    checkpoint.write_atomically(os.path.join(workdir, SUMMARY_MD), "\n".join(text))
    colours = plots.block_colours(labels, BASELINE)  # every entry of the study: colours do not shift as runs finish
    plots.save(plots.pareto_figure(rows, BASELINE, title=title, colours=colours), os.path.join(workdir, PARETO_PNG))
    plots.save(plots.curves_figure(curves, BASELINE, title=title, colours=colours), os.path.join(workdir, CURVES_PNG))
    return rows


def write_study_file(workdir: str, base: Config, entries: Sequence[Entry], seeds: Sequence[int], command: str):
    """``WORKDIR/study.json``: the command, the entries, the seeds and the options every run shares."""
    os.makedirs(workdir, exist_ok=True)
    checkpoint.write_atomically(
        os.path.join(workdir, STUDY_FILE),
        json.dumps(
            {
                "command": command,
                "entries": [e.label for e in entries],
                "seeds": list(seeds),
                "config": {k: v for k, v in base.to_dict().items() if k not in PER_RUN_FIELDS},
            },
            indent=2,
        ),
    )


def study_bar(weights: dict, steps_per_run: int, runs: list, left: list, progress: bool) -> tqdm:
    """A bar over every run's forecast step seconds, the finished runs already counted."""
    return tqdm(
        total=sum(weights[e.label] * steps_per_run for e, _ in runs),
        initial=sum(weights[e.label] * steps_per_run for e, s in runs if (e, s) not in left),
        disable=not progress,
        bar_format="study {percentage:3.0f}%|{bar}| {elapsed} elapsed, ETA {remaining}{postfix}",
        dynamic_ncols=True,
    )


def run_study(
    base: Config,
    entries: Sequence[Entry],
    seeds: Sequence[int],
    workdir: str,
    *,
    repeats: int = 10,
    progress: bool = True,
    command: str = "",
    say=print,
) -> Outcome:
    """Train every (entry, seed) not yet finished, seed by seed, then write the study's outputs.

    A run that diverges is reported and the study goes on; an interruption (SIGTERM/SIGINT,
    :class:`attnjax.train.Interrupted`) writes the outputs of the runs finished so far and
    is raised again. Rerunning continues where it stopped.
    """
    for entry in entries:
        train.check_config(run_config(base, entry, seeds[0]))
    plots.check_available()
    check_path_characters(workdir)
    check_runs(base, entries, seeds, workdir)
    # The dataset's refusals (a missing folder, a batch larger than the set) come before the study's first file.
    dataset = train.load_dataset(base)
    steps_per_run = base.epochs * data.pipeline.steps_per_epoch(len(dataset.train), base.batch_size * base.grad_accum)
    write_study_file(workdir, base, entries, seeds, command)
    costs = load_costs(workdir, base, entries, dataset, repeats, progress, say=say)
    runs = [(entry, seed) for seed in seeds for entry in entries]  # seed by seed: a partial study is paired
    left = [(e, s) for e, s in runs if not is_finished(run_config(base, e, s), run_dir(workdir, e, s))]
    forecast = cost.study_seconds(costs, [e.label for e, _ in left], steps_per_run)
    say(
        f"attnjax.compare: {len(entries)} entries x {len(seeds)} seeds = {len(runs)} runs, {len(runs) - len(left)} "
        f"finished; {len(left)} to train, forecast {train.format_duration(forecast)} on this machine",
        flush=True,
    )
    diverged: list[str] = []
    # The bar counts forecast seconds of train steps, so its ETA weighs slow blocks as they are.
    weights = {e.label: costs[e.label].step_s for e in entries}
    bar = study_bar(weights, steps_per_run, runs, left, progress)
    preemption = Preemption()  # one for the whole study: a signal between two runs stops it too
    try:
        with preemption:
            for number, (entry, seed) in enumerate(left, 1):
                if preemption.received is not None:
                    raise Interrupted(f"{preemption.signal_name} between two runs: every finished run is kept")
                bar.set_postfix_str(f"{entry.label} seed {seed} (run {number}/{len(left)} to train)")
                config, rundir = run_config(base, entry, seed), run_dir(workdir, entry, seed)
                weight = weights[entry.label]
                say(f"attnjax.compare: {entry.label}, seed {seed} -> {rundir}", flush=True)
                try:
                    train.train_and_evaluate(
                        config,
                        rundir,
                        dataset=dataset,
                        preemption=preemption,
                        on_step=lambda _, w=weight: bar.update(w),
                    )
                except train.TrainingDiverged as error:
                    diverged.append(f"{entry.label} seed {seed}: {error}")
                    say(f"attnjax.compare: {entry.label} seed {seed} diverged; the study goes on", file=sys.stderr)
                jax.clear_caches()  # each run compiles its own steps: drop the finished run's executables
    except BaseException:
        bar.close()
        if any(is_finished(run_config(base, e, s), run_dir(workdir, e, s)) for e, s in runs):
            write_outputs(workdir, base, entries, seeds, costs, command)
        raise
    bar.close()
    rows = write_outputs(workdir, base, entries, seeds, costs, command)
    finished = sum(is_finished(run_config(base, e, s), run_dir(workdir, e, s)) for e, s in runs)
    return Outcome(finished, len(runs), diverged, rows)
