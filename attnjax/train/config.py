"""The training configuration: every option of ``python -m attnjax.train`` and its default."""

# No `from __future__ import annotations`: the CLI reads each field's type as a callable.
import dataclasses
import json
import types
import typing

from attnjax import models
from attnjax.validate import InputError


def _option(default, help: str, parse=None):
    """A config field; ``parse`` converts the command-line string when the type is optional."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


DEFAULT_BLOCK = "seed"  # the block of a run whose model has no attention of its own (attention_net, cifar_resnet*)


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run. The CLI exposes each field as ``--field-name``."""

    dataset: str = _option(
        "digits",
        "'digits' (embedded, no download), 'folder:PATH' (PATH/{train,test}/<class>/*.png|jpg|jpeg|webp|gif), "
        "or a TFDS image-classification dataset (mnist, fashion_mnist, cifar10, ...)",
    )
    model: str = _option("attention_net", "network that hosts the attention block")
    block: str | None = _option(
        None,
        "attention block inside the model ('none' for the baseline); default: the model's own, with its options "
        "(timm's networks: se in seresnet*/seresnext*, eca in ecaresnet*, none in resnet*/resnext*), seed in "
        "attnjax's attention_net and cifar_resnet*",
        parse=str,
    )
    block_option: tuple = _option(
        (),
        "an option of the block as KEY=VALUE, repeatable: --block cbam --block-option reduction=8 "
        "--block-option kernel_size=5 (python -m attnjax.blocks --options lists them)",
    )
    model_option: tuple = _option(
        (), "an option of the model as KEY=VALUE, repeatable: --model cifar_resnet18 --model-option stem=imagenet"
    )
    epochs: int = _option(12, "passes over the training set")
    batch_size: int = _option(128, "global batch size, split evenly over all local devices")
    learning_rate: float = _option(1e-3, "learning rate (Adam: the tutorial's 1e-3); the peak with a schedule")
    lr_schedule: str = _option(
        "cosine", "learning-rate schedule: cosine (decays to 0 over the run) or constant (the tutorial's)"
    )
    optimizer: str = _option(
        "adam", "adam (the tutorial's), adamw (decoupled weight decay), sgd (momentum) or lamb (large batches)"
    )
    weight_decay: float = _option(
        0.0,
        "weight decay for adamw, sgd and lamb (0: none; 0.05 is typical for adamw); only kernels and embeddings "
        "decay, never biases or norm scales",
    )
    momentum: float = _option(0.9, "sgd's momentum (0: plain SGD); the other optimizers ignore it")
    nesterov: bool = _option(False, "sgd with Nesterov momentum")
    warmup_epochs: float = _option(
        0.0, "raise the learning rate linearly from 0 to --learning-rate over this many epochs, then the schedule"
    )
    clip_grad_norm: float = _option(0.0, "scale the gradients down to this global norm when above it (0: off)")
    seed: int = _option(0, "seed for parameter initialisation, the order of training batches and augmentation")
    init_from: str | None = _option(
        None,
        "start from timm's pretrained weights of --model: a .safetensors/.pth/.bin file, a hub-snapshot folder or a "
        "hub id (timm/seresnet50.ra2_in1k); a classifier of another class count is new, and the dataset takes "
        "the weights' preprocessing (size, eval crop, mean/std)",
        parse=str,
    )
    augment: str = _option(
        "auto",
        "training augmentation: auto (the dataset's default; rrc+flip with --init-from), none, crop (pad and "
        "shift), flip, crop+flip, rrc (timm's random-resized crop) or rrc+flip",
    )
    image_size: int = _option(
        0,
        "resize TFDS and folder images to N x N (shorter side, centre crop); 0 keeps them (with --init-from: "
        "the weights' size)",
    )
    data_dir: str | None = _option(None, "TFDS data_dir: where TFDS datasets are prepared and read", parse=str)
    manual_dir: str | None = _option(
        None, "folder with a TFDS dataset's original files, to prepare it with no network", parse=str
    )
    parallel: str = _option("pmap", "data-parallel wrapper: pmap (over local devices) or jit (a Mesh over all devices)")
    dtype: str = _option(
        "float32", "compute dtype: float32, bfloat16, or float16 (with dynamic loss scaling); parameters stay float32"
    )
    xla_options: str = _option(
        "tuned",
        "XLA:CPU compiler options: tuned (attnjax's, faster on CPU; see attnjax/xla_options.py) or default "
        "(XLA's own, for comparison); no effect on GPU/TPU",
    )
    grad_accum: int = _option(1, "average the gradients of N batches per update: an N-times larger batch")
    checkpoint_every_steps: int = _option(
        0, "also save a checkpoint every N optimizer steps (0: only at epoch ends, on preemption and at the end)"
    )
    checkpoint_every_minutes: float = _option(
        10.0, "also save a checkpoint when M minutes have passed since the last one (0: never by time)"
    )
    tensorboard: bool = _option(
        False,
        "also write TensorBoard scalars to WORKDIR/tb (needs pip install 'attnjax[tensorboard]'; no TensorFlow)",
    )
    log_every_steps: int = _option(
        50, "with --tensorboard: log the train loss, learning rate and images/s every N optimizer steps"
    )
    profile_steps: str = _option(
        "", "START:COUNT: write a jax.profiler trace of optimizer steps START.. to WORKDIR/profile ('': off)"
    )
    distributed: bool = _option(
        False, "start jax.distributed (multi-host); on TPU pods and SLURM/Open MPI clusters it finds the rest itself"
    )
    coordinator_address: str | None = _option(
        None, "multi-host: HOST:PORT of process 0 (or $ATTNJAX_COORDINATOR_ADDRESS)", parse=str
    )
    num_processes: int | None = _option(
        None, "multi-host: the number of processes (or $ATTNJAX_NUM_PROCESSES)", parse=int
    )
    process_id: int | None = _option(None, "multi-host: this process's index (or $ATTNJAX_PROCESS_ID)", parse=int)

    def __post_init__(self):
        # No --block: the model's own attention (models.default_block), its options before any --block-option,
        # or attnjax's trainer default "seed" for a model without one of its own. Resolved here, so the config
        # recorded (and compared on resume) names the block that trained.
        if self.block is None:
            name, options = models.default_block(self.model) or (DEFAULT_BLOCK, {})
            given = tuple(self.block_option) if isinstance(self.block_option, (tuple, list)) else self.block_option
            object.__setattr__(self, "block", name)
            object.__setattr__(self, "block_option", tuple(f"{k}={v}" for k, v in options.items()) + given)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "Config":
        """The config a run recorded (``config.json``'s ``config``): lists back to tuples, missing fields as defaults.

        A field missing from ``saved`` (a run from before the field existed) is its default, which
        is what that run trained with; a field this version does not know is refused.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise InputError(f"the recorded config has unknown option(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})

    def trajectory_diff(self, other: dict) -> list[str]:
        """The fields that change training's result and differ from ``other`` (a saved config), as lines.

        A field missing from ``other`` (a run from before the field existed) counts as its default,
        which is what that run trained with.
        """
        defaults = {field.name: field.default for field in dataclasses.fields(self)}
        if "block" not in other:  # the block the saved model's default resolves to (Config.__post_init__)
            resolved = Config(model=other.get("model", defaults["model"]), block_option=())
            defaults["block"], defaults["block_option"] = resolved.block, resolved.block_option
        # JSON turns tuples into lists: compare repeatable options as tuples.
        saved = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in ((name, other.get(name, defaults[name])) for name in TRAJECTORY_FIELDS)
        }
        lines = []
        for name in TRAJECTORY_FIELDS:
            if saved[name] != getattr(self, name):
                line = f"--{name.replace('_', '-')}: the run has {saved[name]!r}, this command {getattr(self, name)!r}"
                renamed_from = {new: old for old, new in models.RENAMED.items()}.get(saved[name])
                if name == "model" and renamed_from == self.model:
                    line += (
                        f" (the run's {renamed_from!r} is now named {saved[name]!r}; {self.model!r} is timm's network)"
                    )
                lines.append(line)
        return lines


# Beside a recorded config (config.json, a checkpoint's record): the version of the model names it
# uses. Absent in runs recorded before timm's networks took the names in models.RENAMED.
REGISTRY_KEY = "registry"


def recorded_config(run: dict) -> dict:
    """The ``config`` of a run's record (``config.json`` or a checkpoint's record), in today's model names.

    A record without ``REGISTRY_KEY`` predates the rename of attnjax's CIFAR ResNets
    (``resnet18`` is now ``cifar_resnet18``, see :data:`attnjax.models.RENAMED`): its names are
    translated, so such a run resumes, is drawn and is compared as the network it trained.
    """
    config = dict(run["config"])
    if run.get(REGISTRY_KEY, 1) < models.REGISTRY_VERSION and config.get("model") in models.RENAMED:
        config["model"] = models.RENAMED[config["model"]]
    return config


def _json_kind(value) -> str:
    """How JSON spells ``value``'s type, for a refusal (bool first: it is an int in Python)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a decimal number"
    return {str: "a string", list: "a list", tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _field_kind(field: dataclasses.Field) -> tuple[type, bool]:
    """A field's type and whether it takes null (``str | None``)."""
    args = typing.get_args(field.type) if isinstance(field.type, types.UnionType) else ()
    if args:
        return next(arg for arg in args if arg is not type(None)), type(None) in args
    return field.type, False


def check_config_fields(fields: dict, source: str, choices=None) -> dict:
    """``fields`` (option names and JSON values) checked against :class:`Config`'s types; the values to use.

    A value of the wrong type raises :class:`InputError` with one line naming ``source`` (such as
    ``--config FILE``), the field, the value and what the field takes. The values returned are
    ready for ``Config(**...)``: lists as tuples, whole numbers in float fields as floats.
    ``choices`` (name: callable listing the valid values) defaults to the recipe's ``CHOICES``.
    The checks are strict where argparse would convert: a file's value is never parsed from a
    string, so ``"false"`` would otherwise be a truthy string and ``3.5`` epochs would train.
    """
    if choices is None:
        from attnjax.train import recipe  # here, not above: recipe imports this module

        choices = recipe.CHOICES
    by_name = {field.name: field for field in dataclasses.fields(Config)}
    unknown = sorted(set(fields) - set(by_name))
    if unknown:
        raise InputError(f"{source}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(by_name)}")
    checked = {}
    for name, value in fields.items():
        kind, nullable = _field_kind(by_name[name])
        example = by_name[name].default
        if value is None and nullable:
            checked[name] = None
            continue
        if kind is bool:
            ok, takes, example = isinstance(value, bool), "true or false", None
        elif kind is int:  # a JSON integer only: 3.0 and true are refused, not rounded or counted as 1
            ok, takes = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        elif kind is float:
            ok, takes = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
            value = float(value) if ok else value
        elif kind is tuple:  # repeatable KEY=VALUE options: a string would be read character by character
            ok = isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value)
            takes, example = "a list of strings", ["KEY=VALUE"]
            value = tuple(value) if ok else value
        elif name in choices:  # as argparse checks a flag's value against its choices
            valid = choices[name]()
            ok, takes, example = isinstance(value, str) and value in valid, f"one of: {', '.join(valid)}", None
        else:
            ok, takes = isinstance(value, kind), "a string"
        if not ok:
            shown = json.dumps(value, default=str)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            kind_text = "" if value is None else f" ({_json_kind(value)})"
            takes += " or null" if nullable else ""
            takes += f", such as {json.dumps(example)}" if example not in (None, "", ()) else ""
            raise InputError(f'{source}: "{name}" is {shown}{kind_text}; it takes {takes}')
        checked[name] = value
    return checked


# The options that change what training computes: a run continues only with all of them unchanged.
# Paths, checkpoint intervals and multi-host addresses may change between an interruption and its resume.
TRAJECTORY_FIELDS = (
    "dataset",
    "model",
    "block",
    "block_option",
    "model_option",
    "seed",
    "batch_size",
    "learning_rate",
    "lr_schedule",
    "optimizer",
    "weight_decay",
    "momentum",
    "nesterov",
    "warmup_epochs",
    "clip_grad_norm",
    "epochs",
    "dtype",
    "grad_accum",
    "augment",
    "image_size",
    "parallel",
    "init_from",
)


def other_options_message(workdir: str, diff: list[str]) -> str:
    """The refusal of a command whose options differ from the run in ``workdir``.

    ``diff``: the lines of :meth:`Config.trajectory_diff`.
    """
    return (
        f"{workdir} holds a run with other options, and continuing it with these would not reproduce it:\n  "
        + "\n  ".join(diff)
        + "\nRerun with the run's options to continue it, or pass a new --workdir."
    )
