"""The training configuration: every option of ``python -m attnjax.train`` and its default."""

# No `from __future__ import annotations`: the CLI reads each field's type as a callable.
import dataclasses


def _option(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of one training run. The CLI exposes each field as ``--field-name``."""

    dataset: str = _option("digits", "dataset to train and test on")
    model: str = _option("attention_net", "network that hosts the attention block")
    block: str = _option("seed", "attention block inside the model ('none' for the baseline)")
    epochs: int = _option(12, "passes over the training set")
    batch_size: int = _option(128, "global batch size, split evenly over all local devices")
    learning_rate: float = _option(1e-3, "Adam learning rate (the tutorial's 1e-3)")
    seed: int = _option(0, "seed for parameter initialisation and the order of training batches")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
