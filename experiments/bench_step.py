"""Train-step throughput: attnjax's AttentionNet against the PyTorch eager equivalent.

Both take the same weights and the same batches. Steps alternate between the frameworks
(JAX jit, JAX pmap as the CLI runs it, PyTorch) so that machine noise hits all three
alike; each figure is the median over the timed steps after warm-up.

    python experiments/bench_step.py                    # 8x8x3 and 32x32x3, batch 128
    python experiments/bench_step.py --sizes 32 --steps 50 --block softmax

Needs torch (pip install torch==2.13.0, as the `dev` extra does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from torch_reference import TorchAttentionNet, flax_to_torch_state, nhwc_to_nchw  # noqa: E402

from attnjax import models, parallel  # noqa: E402
from attnjax.train import create_train_state, train_step  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size: int, block: str, batch: int, steps: int, warmup: int) -> dict:
    image_shape = (size, size, 3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (batch, *image_shape)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    jax_batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}

    net = models.create("attention_net", num_classes=10, block=block)
    state = create_train_state(jax.random.key(0), net, image_shape, 1e-3)

    reference = TorchAttentionNet(3, (size, size), num_classes=10, block=None if block == "none" else block)
    reference.load_state_dict(flax_to_torch_state(state.params, reference.final_size))
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    torch_images, torch_labels = nhwc_to_nchw(images), torch.from_numpy(labels).long()

    jit_step = jax.jit(train_step, donate_argnums=0)
    device = jax.local_devices()[:1]
    pmap_step = parallel.pmap_step(train_step, device, donate_state=True)
    pmap_batch = parallel.put_on_devices({"image": images, "label": labels}, device)
    pmap_state = parallel.replicate(state, device)
    jit_state = jax.tree.map(jnp.array, state)  # each path donates its own copy

    def run_jit():
        nonlocal jit_state
        jit_state, metrics = jit_step(jit_state, jax_batch)
        jax.block_until_ready(metrics)

    def run_pmap():
        nonlocal pmap_state
        pmap_state, metrics = pmap_step(pmap_state, pmap_batch)
        jax.block_until_ready(metrics)

    def run_torch():
        optimizer.zero_grad()
        loss = F.cross_entropy(reference(torch_images), torch_labels)
        loss.backward()
        optimizer.step()
        loss.item()

    # The first call traces and compiles: its time, less a normal step's, is the compile time.
    first_step = {"jit": timed(run_jit), "pmap": timed(run_pmap), "torch": timed(run_torch)}
    times = {"jit": [], "pmap": [], "torch": []}
    runners = {"jit": run_jit, "pmap": run_pmap, "torch": run_torch}
    for i in range(warmup + steps):
        for name, runner in runners.items():
            seconds = timed(runner)
            if i >= warmup:
                times[name].append(seconds)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "size": size,
        "compile_seconds": {name: first_step[name] - median[name] for name in ("jit", "pmap")},
        "images_per_second": {name: batch / m for name, m in median.items()},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="square input sizes (3 channels)")
    parser.add_argument("--block", default="seed", help="attention block: none, seed or softmax")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per framework (median taken)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per framework first")
    args = parser.parse_args(argv)

    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); AttentionNet + {args.block}, batch {args.batch_size}, float32, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'input':>9} {'jax jit img/s':>14} {'jax pmap img/s':>15} {'torch img/s':>12} "
        f"{'jit/torch':>10} {'pmap/torch':>11} {'compile s (jit, pmap)':>22}"
    )
    for size in args.sizes:
        r = bench_size(size, args.block, args.batch_size, args.steps, args.warmup)
        ips = r["images_per_second"]
        print(
            f"{size:>3}x{size:<3}x3 {ips['jit']:>14,.0f} {ips['pmap']:>15,.0f} {ips['torch']:>12,.0f} "
            f"{ips['jit'] / ips['torch']:>9.2f}x {ips['pmap'] / ips['torch']:>10.2f}x "
            f"{r['compile_seconds']['jit']:>13.2f}, {r['compile_seconds']['pmap']:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
