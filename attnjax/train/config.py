"""The training configuration: every option of ``python -m attnjax.train`` and its default."""

# No `from __future__ import annotations`: the CLI reads each field's type as a callable.
import dataclasses

from attnjax.validate import InputError


def _option(default, help: str, parse=None):
    """A config field; ``parse`` converts the command-line string when the type is optional."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse})


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run. The CLI exposes each field as ``--field-name``."""

    dataset: str = _option(
        "digits",
        "'digits' (embedded, no download), 'folder:PATH' (PATH/{train,test}/<class>/*.png|jpg), "
        "or a TFDS image-classification dataset (mnist, fashion_mnist, cifar10, ...)",
    )
    model: str = _option("attention_net", "network that hosts the attention block")
    block: str = _option("seed", "attention block inside the model ('none' for the baseline)")
    block_option: tuple = _option(
        (),
        "an option of the block as KEY=VALUE, repeatable: --block cbam --block-option reduction=8 "
        "--block-option kernel_size=5 (python -m attnjax.blocks --options lists them)",
    )
    model_option: tuple = _option(
        (), "an option of the model as KEY=VALUE, repeatable: --model resnet18 --model-option stem=imagenet"
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
    augment: str = _option("auto", "training augmentation: auto (the dataset's default), none, crop, flip or crop+flip")
    image_size: int = _option(0, "resize TFDS and folder images to N x N (shorter side, centre crop); 0 keeps them")
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
        # JSON turns tuples into lists: compare repeatable options as tuples.
        saved = {
            name: tuple(value) if isinstance(value, list) else value
            for name, value in ((name, other.get(name, defaults[name])) for name in TRAJECTORY_FIELDS)
        }
        return [
            f"--{name.replace('_', '-')}: the run has {saved[name]!r}, this command {getattr(self, name)!r}"
            for name in TRAJECTORY_FIELDS
            if saved[name] != getattr(self, name)
        ]


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
)
