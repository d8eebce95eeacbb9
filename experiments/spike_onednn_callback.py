"""Spike (issue 10): could oneDNN convolutions, called from JAX on the host, beat XLA:CPU's?

The route a pip-only extra could take without a compiler is a host callback: ``jax.pure_callback``
into a library that runs oneDNN. PyTorch's CPU convolutions (channels_last, float32) are oneDNN,
so calling them through the callback is an upper bound for that route: the same kernels, with
the callback's real costs (leaving the compiled XLA program, handing buffers over, no fusion
across the call). This times AttentionNet's conv2 (3x3, 64 -> 128) forward + backward both ways,
alternating, and checks they compute the same.

    python experiments/spike_onednn_callback.py --sizes 8 16
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from bench_step import alternate, cpu_model

from attnjax import xla_options


def _nchw_view(x: np.ndarray) -> torch.Tensor:
    """An NHWC numpy array as a channels_last NCHW tensor, without copying."""
    with warnings.catch_warnings():  # the callback's buffers are read-only; torch only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2)


def _torch_kernel(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)


def _host_forward(x, w):
    y = F.conv2d(_nchw_view(x), _torch_kernel(w), padding=1)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


def _host_backward(x, w, dy):
    grads = torch.ops.aten.convolution_backward(
        _nchw_view(dy), _nchw_view(x), _torch_kernel(w), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )  # fmt: skip
    dx = grads[0].permute(0, 2, 3, 1).contiguous().numpy()
    dw = grads[1].permute(2, 3, 1, 0).contiguous().numpy()
    return dx, dw


@jax.custom_vjp
def onednn_conv(x, w):
    """3x3 'SAME' NHWC/HWIO conv through oneDNN (PyTorch's CPU kernels) on the host."""
    shape = jax.ShapeDtypeStruct((*x.shape[:3], w.shape[-1]), x.dtype)
    return jax.pure_callback(_host_forward, shape, x, w)


def _fwd(x, w):
    return onednn_conv(x, w), (x, w)


def _bwd(res, dy):
    x, w = res
    return jax.pure_callback(
        _host_backward, (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype)), x, w, dy
    )


onednn_conv.defvjp(_fwd, _bwd)


def xla_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def measure(size: int, batch: int, steps: int, options) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 64), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 128), dtype=np.float32) * 0.05)

    def grad_of(conv):
        loss = lambda x, w: jnp.sum(jnp.square(conv(x, w)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)

    xla, callback = grad_of(xla_conv), grad_of(onednn_conv)
    gx, gc = xla(x, w), callback(x, w)
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(gx, gc, strict=True))
    tx = _nchw_view(np.array(x)).requires_grad_()
    tw = _torch_kernel(np.array(w)).requires_grad_()

    def torch_eager():
        torch.autograd.grad(F.conv2d(tx, tw, padding=1).square().sum(), (tx, tw))

    seconds = alternate(
        {
            "xla": lambda: jax.block_until_ready(xla(x, w)),
            "callback": lambda: jax.block_until_ready(callback(x, w)),
            "torch": torch_eager,
        },
        steps,
        3,
    )
    print(
        f"{size:>3}x{size:<2} {seconds['xla'] * 1e3:>8.2f} {seconds['callback'] * 1e3:>12.2f} "
        f"{seconds['torch'] * 1e3:>15.2f} {seconds['xla'] / seconds['callback']:>12.2f}x {diff:>11.1e}",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    options = xla_options.compiler_options() or None
    print(f"{cpu_model()}; conv 3x3 64 -> 128, batch {args.batch}, fwd + bwd (x and w), float32")
    print(
        f"{'map':>6} {'xla ms':>8} {'callback ms':>12} {'torch eager ms':>15} {'xla/callback':>13} {'max |diff|':>11}"
    )
    for size in args.sizes:
        measure(size, args.batch, args.steps, options)


if __name__ == "__main__":
    main()
