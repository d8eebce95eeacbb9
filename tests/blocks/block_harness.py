"""The steps every block's PyTorch parity test repeats, written once.

A block's test file holds its PyTorch reference, written from the paper, and what is its own; these
are the shared steps:

- :func:`setup` and :func:`load`: a random input and random variables, loaded into the reference;
- :func:`check_forward`: the block's output and sown maps against the reference's, in eval or train
  mode, in float32 or float64;
- :func:`check_gradients`: the gradients of ``sum(y * r)`` with respect to the input and every
  parameter against PyTorch's autograd;
- :func:`check_running_stats`: the batch-norm running averages after a train step;
- :func:`apply_jit` and :func:`sown_maps`: the block under jit and its sown maps, for properties;
  :func:`assert_gated`: the output is the input times gates in (0, 1).

The comparisons are to :data:`TOL` (1e-5, absolute and relative) unless a test says otherwise.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch_reference import pytorch_running_var, random_images, random_variables, torch_state_with_stats

from attnjax.compare.pytorch import nchw_to_nhwc, nhwc_to_nchw

TOL = 1e-5


def plain(t: torch.Tensor) -> np.ndarray:
    """A reference's map as it is (not an NCHW image): for ``(name, plain)`` entries of ``maps``."""
    return t.detach().numpy()


def jax_images(shape, seed=0) -> jax.Array:
    """Standard normal images drawn with JAX (the draw of the tests written that way)."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def as_float64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def assert_close(got, want, tol=TOL, err_msg=""):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol, err_msg=err_msg)


def load(reference: torch.nn.Module, variables, to_state=torch_state_with_stats) -> torch.nn.Module:
    """``reference`` with ``to_state(variables)`` loaded, every parameter and buffer (``strict``)."""
    reference.load_state_dict(to_state(variables), strict=True)
    return reference


def setup(block, reference, shape, seed=0, *, variables_seed=None, to_state=torch_state_with_stats, **draw):
    """``(x, variables, reference)``: images of ``shape`` (``seed``), ``block``'s random variables
    (``variables_seed``, default ``seed + 1``; ``draw`` goes to ``random_variables``), loaded into ``reference``."""
    x = random_images(shape, seed)
    variables = random_variables(block, x, seed + 1 if variables_seed is None else variables_seed, **draw)
    return x, variables, load(reference, variables, to_state)


def conv1d_state(variables, module="conv") -> dict[str, torch.Tensor]:
    """ECA's one parameter, a (k,) ``kernel``, as the state of a ``Conv1d(1, 1, k, bias=False)`` named ``module``."""
    kernel = np.array(variables["params"]["kernel"])
    return {f"{module}.weight": torch.from_numpy(kernel.reshape(1, 1, -1))}


def torch_state_with_map_norm(variables, module="norm") -> dict[str, torch.Tensor]:
    """:func:`torch_reference.torch_state_with_stats`, with the LayerNorm ``module``'s (C,) weight and bias as
    (C, 1, 1): those of a PyTorch ``LayerNorm([C, 1, 1])`` over an (N, C, 1, 1) map (GC's transform)."""
    state = torch_state_with_stats(variables)
    for name in (f"{module}.weight", f"{module}.bias"):
        state[name] = state[name].reshape(-1, 1, 1)
    return state


@functools.cache
def _compiled(block, train: bool, mutable: tuple[str, ...]):
    return jax.jit(functools.partial(block.apply, train=train, mutable=list(mutable)))


def apply_jit(block, variables, x, train=False):
    """``block.apply`` under jit (compiled once per block, mode and shape): ``(y, state)``.

    ``state`` holds ``intermediates`` and, in train mode for a block with batch norm, the new ``batch_stats``.
    """
    mutable = ("intermediates", "batch_stats") if train and "batch_stats" in variables else ("intermediates",)
    return _compiled(block, train, mutable)(variables, x)


def sown_maps(state) -> dict:
    """``{name: map}`` of ``state["intermediates"]``, each map sown exactly once."""
    maps = {}
    for name, values in state["intermediates"].items():
        assert len(values) == 1, f"{name} sown {len(values)} times"
        (maps[name],) = values
    return maps


def random_maps(block, shape, seed=0, variables_seed=0):
    """``(x, y, maps)``: images of ``shape``, ``block`` applied to them under jit with random variables
    (``random_variables``), and its sown maps (:func:`sown_maps`)."""
    x = random_images(shape, seed)
    y, state = apply_jit(block, random_variables(block, x, variables_seed), x)
    return x, y, sown_maps(state)


def jit_intermediates(block, numpy=False):
    """``(variables, x) -> (y, intermediates)``: ``block.apply`` under jit; NumPy arrays with ``numpy``."""

    def run(variables, x):
        y, state = apply_jit(block, variables, x)
        if numpy:  # no eager jnp ops on the results after
            return np.asarray(y), jax.tree.map(np.asarray, state["intermediates"])
        return y, state["intermediates"]

    return run


def assert_train_mode_uses_batch_statistics(block, x, bn: str):
    """With ``block``'s own initialisation, train mode (batch statistics) differs from eval mode (running ones)
    and updates the running mean of the batch norm ``bn``. Returns the variables."""
    variables = jax.jit(block.init)(jax.random.key(0), x)
    chex.assert_tree_all_finite(variables)
    y_eval, _ = apply_jit(block, variables, x)
    y_train, state = apply_jit(block, variables, x, train=True)
    assert not np.allclose(y_eval, y_train, atol=1e-3)
    assert not np.allclose(state["batch_stats"][bn]["mean"], variables["batch_stats"][bn]["mean"])
    return variables


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def check_forward(block, x, variables, reference, maps=(), *, train=False, float64=False, tol=TOL):
    """Assert that ``block``'s output and sown maps equal ``reference``'s; returns the block's ``(y, state)``.

    ``reference`` takes the NCHW input and returns the output, or a tuple of the output and the maps
    named in ``maps`` (in that order), or of the output and a dict of maps. Outputs are NCHW images,
    compared in NHWC; a ``(name, convert)`` entry of ``maps`` converts its map instead (:func:`plain`:
    as it is). Both run in train mode (batch statistics) if ``train``, and in float64 if ``float64``,
    which ``reference`` is then switched to.
    """
    if float64:
        x, variables = as_float64((x, variables))
        reference.double()
    with jax.enable_x64(float64):
        y, state = apply_jit(block, variables, x, train)
    reference.train(train)
    with torch.no_grad():
        expected = _outputs(reference(nhwc_to_nchw(x)))
    assert_close(y, nchw_to_nhwc(expected[0]), tol, err_msg="output")
    if len(expected) == 2 and isinstance(expected[1], dict):
        specs, values = list(expected[1]), list(expected[1].values())
    else:
        specs, values = list(maps), list(expected[1:])
    assert len(specs) == len(values), f"the reference returns {len(values)} maps, {len(specs)} named"
    sown = sown_maps(state)
    for spec, value in zip(specs, values, strict=True):
        name, convert = spec if isinstance(spec, tuple) else (spec, nchw_to_nhwc)
        assert_close(sown[name], convert(value), tol, err_msg=name)
    return y, state


def check_gradients(
    block, x, variables, reference, cotangent, *, to_state=torch_state_with_stats, train=False, float64=False, tol=TOL
):
    """Assert that the gradients of ``sum(y * cotangent)`` with respect to ``x`` and every parameter equal
    PyTorch's autograd through ``reference``; returns the block's ``(grad_x, grad_params)``.

    The parameter gradients are compared under the reference's names, through ``to_state`` (the conversion
    that loaded it); every parameter of the reference must have one. Batch norm runs in train mode if
    ``train``. Everything is in float64 if ``float64`` (``reference`` is switched to it).
    """
    if float64:
        x, cotangent, variables = as_float64((x, cotangent, variables))
        reference.double()
    mutable = ["batch_stats"] if "batch_stats" in variables else False

    def loss(x, params):
        y = block.apply({**variables, "params": params}, x, train=train, mutable=mutable)
        return jnp.sum((y[0] if mutable else y) * cotangent)

    with jax.enable_x64(float64):
        grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, variables["params"])
        grad_x, grad_params = np.asarray(grad_x), jax.tree.map(np.asarray, grad_params)
    reference.train(train)
    x_torch = nhwc_to_nchw(x).requires_grad_(True)
    (_outputs(reference(x_torch))[0] * nhwc_to_nchw(cotangent)).sum().backward()
    assert_close(grad_x, nchw_to_nhwc(x_torch.grad), tol, err_msg="input")

    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    buffers = {name for name, _ in reference.named_buffers()}  # running statistics: not gradients
    got = {k: v for k, v in to_state({**variables, "params": grad_params}).items() if k not in buffers}
    assert set(got) == set(expected)
    for name, value in got.items():
        assert_close(np.asarray(value), expected[name], tol, err_msg=name)
    return grad_x, grad_params


def check_running_stats(state, reference, *, old=None, counts=None, module_name=lambda name: name, tol=TOL):
    """Assert that every batch norm's running mean after a train step (``state["batch_stats"]``) equals the
    reference's (Flax's momentum 0.9 is PyTorch's 0.1).

    With ``counts`` (a BN's name -> the values per channel it averaged in the batch) and ``old`` (the
    statistics before the step) the running variances too: PyTorch's takes in the unbiased batch variance,
    Flax's the biased one, converted by :func:`torch_reference.pytorch_running_var`. ``module_name`` maps a
    Flax BN's name to the reference's module.
    """
    torch_state = reference.state_dict()
    for name, stats in jax.tree.map(np.asarray, state["batch_stats"]).items():
        module = module_name(name)
        assert_close(stats["mean"], torch_state[f"{module}.running_mean"], tol, err_msg=name)
        if counts is not None:
            var = pytorch_running_var(stats["var"], old[name]["var"], counts(name))
            assert_close(var, torch_state[f"{module}.running_var"], tol, err_msg=name)


def assert_gated(y, x, *gates, closed=False, rtol=1e-6, atol=1e-6):
    """``y = x * gate_1 * gate_2 ...``; every gate finite and in (0, 1), or in [0, 1] if ``closed``."""
    chex.assert_shape(y, x.shape)
    chex.assert_tree_all_finite((y, gates))
    for gate in gates:
        inside = (gate >= 0) & (gate <= 1) if closed else (gate > 0) & (gate < 1)
        assert jnp.all(inside)
    expected = x
    for gate in gates:
        expected = expected * gate
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=atol)
