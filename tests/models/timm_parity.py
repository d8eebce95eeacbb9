"""The parity checks of attnjax's timm networks against timm 1.0.29 itself, shared by test_resnet.py and
test_sknet_resnest.py: parameter counts, eval- and train-mode outputs and running statistics from the same
(random) weights, and the weight round trip.

Every timm model here has every parameter and running statistic drawn at random (not timm's init: BN scales in
[0.5, 1.5], offsets, running means and biases in [-0.5, 0.5], running variances in [0.5, 2], weights
N(0, 1/fan_in)), converted with ``from_timm``. Each model's jitted apply is cached (the last model only), so
each model and input size compiles once per mode.

Tolerances, relative to the largest |logit|:

- evaluation: within :data:`TOL` (1e-4) of timm's float32 logits;
- training: batch norm then normalises with the batch's own statistics, and over few values per channel it
  amplifies float32 rounding: in the pooled (N, 1, 1, C) norms of SK's and ResNeSt's attention (N values), and
  with depth (the last stage has 2 x 2 maps at 33 x 33). Measured (relative errors of the logits):

      at 33 x 33              attnjax f32 - timm f64   timm f32 - timm f64   attnjax f64 - timm f64
      resnet101, batch 2      2.2e-4                   2.5e-4                4.8e-13
      resnet101, batch 8      9.7e-5                   1.1e-4                1.7e-13
      resnest26d, batch 2     2.7e-4                   6.3e-5                5.0e-13
      resnest26d, batch 8     7.5e-6                   1.1e-5                2.0e-14

  In float64 the two compute the same thing; in float32 both round by similar amounts, which one more depends
  on the draw (4x at resnest26d's batch of 2, where the pooled norms see 2 values). So train mode runs a batch
  of 8 (:data:`TRAIN_BATCH`: the pooled norms see 8 values) and is compared with timm run in float64
  (``model.double()``), within ``max(TOL, 2 x timm's own float32 error against its float64)``
  (:data:`TRAIN_ROUNDING_FACTOR`): rounding as large as timm's own passes, a wrong computation (an O(1)
  error) does not. The running statistics are compared within the same tolerance.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from timm_reference import import_timm

from attnjax import models
from attnjax.layers import torch_running_var
from attnjax.models import timm_weights

TOL = 1e-4  # relative to the largest |logit|
TRAIN_ROUNDING_FACTOR = 2  # train mode: within this many times timm's own float32 error (see the docstring)
TRAIN_BATCH = 8


def randomize(state: dict, seed: int = 0) -> dict:
    """A copy of timm's ``state`` with every parameter and running statistic drawn at random (the module's
    docstring has the distributions); ``num_batches_tracked`` kept."""
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            drawn[key] = value.clone()
        elif key.endswith("running_var"):
            drawn[key] = torch.rand(value.shape, generator=generator) * 1.5 + 0.5
        elif value.ndim == 1:  # BN scales ([0.5, 1.5]); BN offsets, running means, biases ([-0.5, 0.5])
            low = 0.5 if key.endswith(".weight") else -0.5
            drawn[key] = torch.rand(value.shape, generator=generator) + low
        else:
            drawn[key] = torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5
        drawn[key] = drawn[key].to(value.dtype)
    return drawn


@functools.lru_cache(maxsize=1)
def timm_state(name: str, seed: int = 0) -> dict:
    """timm's ``name`` (1000 classes) with every parameter and running statistic drawn at random: its state dict."""
    return randomize(import_timm().create_model(name).state_dict(), seed)


def timm_model(name: str):
    model = import_timm().create_model(name)
    model.load_state_dict(timm_state(name), strict=True)
    return model


@functools.lru_cache(maxsize=1)
def attnjax_model(name: str):
    """The model, its variables from timm's state and its jitted apply (eval and train), compiled per input size."""
    net = models.create(name, num_classes=1000)
    variables = timm_weights.from_timm(name, timm_state(name))
    evaluate = jax.jit(functools.partial(net.apply, train=False))
    train = jax.jit(functools.partial(net.apply, train=True, mutable=["batch_stats"]))
    return net, variables, evaluate, train


def images(size: int, seed: int = 0, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def torch_run(model, x: np.ndarray) -> np.ndarray:
    """``model`` on NHWC ``x`` (in the model's dtype), NCHW inside."""
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        return model(torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype)).numpy()


def relative_error(y, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(y, np.float64) - expected).max() / np.abs(expected).max())


def parameter_count(name: str) -> tuple[int, int]:
    """(attnjax's, timm's) parameter count of ``name`` with 1000 classes."""
    net = models.create(name, num_classes=1000)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))
    return ours, sum(p.numel() for p in import_timm().create_model(name).parameters())


def eval_error(name: str, size: int) -> float:
    """The eval-mode relative error of attnjax's ``name`` against timm's float32 on a batch of 2 at ``size``."""
    _, variables, evaluate, _ = attnjax_model(name)
    x = images(size, seed=size)
    expected = torch_run(timm_model(name).eval(), x)
    return relative_error(evaluate(variables, x), expected)


def batch_norm_counts(model, x) -> dict[str, int]:
    """The values per channel each batch norm of ``model`` normalises over on input ``x``: N * H * W."""
    counts, hooks = {}, []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            hook = functools.partial(lambda n, m, args: counts.__setitem__(n, args[0][:, 0].numel()), module_name)
            hooks.append(module.register_forward_pre_hook(hook))
    torch_run(model, x)
    for hook in hooks:
        hook.remove()
    return counts


def check_train_mode(name: str, size: int = 33, batch: int = TRAIN_BATCH) -> dict[str, float]:
    """Train-mode logits and updated running statistics of attnjax's ``name`` against timm's, in float64 (the
    module's docstring: the tolerance). Asserts; returns the errors."""
    _, variables, _, train = attnjax_model(name)
    x = images(size, seed=1, batch=batch)
    float32 = timm_model(name).train()
    counts = batch_norm_counts(float32, x)
    reference = timm_model(name).double().train()
    expected = torch_run(reference, x)  # updates the running statistics, momentum 0.1
    rounding = relative_error(torch_run(float32, x), expected)  # timm's own float32 rounding
    logits, updates = train(variables, x)
    tol = max(TOL, TRAIN_ROUNDING_FACTOR * rounding)
    error = relative_error(logits, expected)
    assert error < tol, f"train-mode logits: relative error {error:.3g}, timm's own float32 error {rounding:.3g}"

    before, after = timm_state(name), reference.state_dict()
    ours = timm_weights.to_timm(name, {"params": variables["params"], "batch_stats": updates["batch_stats"]})
    stats = 0
    for key, value in after.items():
        if key.endswith("running_mean"):
            got = ours[key]
        elif key.endswith("running_var"):  # Flax takes in the biased batch variance, torch the unbiased one
            count = counts[key.removesuffix(".running_var")]
            got = torch_running_var(ours[key], count, steps=1, initial=before[key].numpy())
        else:
            continue
        value = value.numpy()
        np.testing.assert_allclose(got, value, rtol=tol, atol=tol * np.abs(value).max(), err_msg=key)
        stats += 1
    assert stats == 2 * len(counts)  # every batch norm's running mean and variance
    return {"logits": error, "timm_float32": rounding}


def check_round_trip(name: str) -> None:
    """``to_timm(from_timm(sd))`` is ``sd``: the same keys in timm's order, dtypes, shapes and bits."""
    state = timm_state(name)
    variables = timm_weights.from_timm(name, state)
    back = timm_weights.to_timm(name, variables, as_torch=True)
    assert list(back) == list(state)  # the same keys, in timm's order
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key


def float64_train_error(name: str, size: int = 33, batch: int = 2) -> float:
    """Train-mode logits of attnjax's ``name`` in float64 against timm's in float64, same (random) weights: the
    two compute the same thing, so this is rounding of float64 (about 1e-13), and what separates them in
    float32 is float32's rounding (the module's docstring)."""
    x = images(size, seed=1, batch=batch)
    expected = torch_run(timm_model(name).double().train(), x)
    with jax.enable_x64(True):
        net = models.create(name, num_classes=1000, dtype=jnp.float64)
        variables = jax.tree.map(lambda a: np.asarray(a, np.float64), timm_weights.from_timm(name, timm_state(name)))
        logits, _ = net.apply(variables, x.astype(np.float64), train=True, mutable=["batch_stats"])
        assert logits.dtype == jnp.float64
        return relative_error(logits, expected)
