"""The model variables that training leaves in the workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import models
from attnjax.train import checkpoint
from attnjax.validate import InputError


def init_variables(block: str, seed: int = 0) -> dict:
    net = models.create("attention_net", num_classes=10, block=block)
    return net.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))


def test_saved_variables_come_back_exactly(tmp_path):
    trained = init_variables("bam", seed=1)  # bam has batch_stats as well as params
    checkpoint.save_variables(str(tmp_path), trained)
    restored = checkpoint.load_variables(str(tmp_path), init_variables("bam", seed=0))
    assert jax.tree.structure(restored) == jax.tree.structure(trained)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(trained), strict=True):
        np.testing.assert_array_equal(got, want)
    assert not (tmp_path / (checkpoint.VARIABLES_FILE + ".partial")).exists()


def test_a_missing_file_says_to_train_first(tmp_path):
    with pytest.raises(InputError, match="does not exist: train a model"):
        checkpoint.load_variables(str(tmp_path), init_variables("seed"))


def test_a_corrupt_file_is_named_and_left_alone(tmp_path):
    path = tmp_path / checkpoint.VARIABLES_FILE
    path.write_bytes(b"\x93not msgpack at all")
    with pytest.raises(InputError, match="not a readable variables file"):
        checkpoint.load_variables(str(tmp_path), init_variables("seed"))
    assert path.read_bytes() == b"\x93not msgpack at all"


def test_variables_of_another_model_are_refused(tmp_path):
    checkpoint.save_variables(str(tmp_path), init_variables("softmax"))
    with pytest.raises(InputError, match="does not match the model"):
        checkpoint.load_variables(str(tmp_path), init_variables("seed"))
