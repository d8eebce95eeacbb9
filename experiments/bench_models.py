"""One training step of timm's ResNet-50 and SE-ResNet-50: attnjax (JAX, jit) against timm's PyTorch eager, on this CPU.

What one step is, on both sides: forward + backward + an SGD update (momentum 0.9, lr 0.01, no
weight decay), softmax cross-entropy over 1000 classes, train mode (batch norm normalises with
the batch's statistics and updates its running ones), float32, random images (seeded) and
random labels, batch 32 at 224x224 by default.

    attnjax  ``models.create(name, num_classes=1000)`` trained by the trainer's own step:
             ``attnjax.train.step.train_step`` under ``jax.jit`` with the state donated
             (``donate_argnums=0``) and attnjax's XLA:CPU options as ``compiler_options``; NHWC
             input on the device once; each timed step ends with ``jax.block_until_ready``
    timm     ``timm.create_model(name, pretrained=False).train()``, ``torch.optim.SGD`` (its
             defaults otherwise: the per-tensor loop on CPU), NCHW contiguous input (channels-last
             with ``--channels-last``); eager, so each step is synchronous on the CPU

All variants live in ONE process and alternate round-robin (attnjax resnet50, attnjax
seresnet50, timm resnet50, timm seresnet50, then again) after each has compiled (JAX) and run
``--warmup`` steps, so machine noise hits them alike. Reported per variant: the median step
seconds and images/s; per framework the ratio SE / plain (seresnet50's throughput over
resnet50's) beside timm's published GPU ratio; per model attnjax / timm (throughput).

``import timm`` imports torchvision, whose wheel for torch 2.13.0 fails to import beside the CPU
build of torch. timm's models never run torchvision code, so on such a machine put the placeholder
package ``tests/timm_standin`` first on the path, as the tests do (tests/timm_reference.py, and
tests/timm_standin/README.md); where torchvision imports, leave PYTHONPATH alone:

    PYTHONPATH=tests/timm_standin python experiments/bench_models.py     # 224, batch 32, 5 repeats
    PYTHONPATH=tests/timm_standin python experiments/bench_models.py --image-size 64 --batch-size 2 --repeats 2
    PYTHONPATH=tests/timm_standin python experiments/bench_models.py --json /tmp/bench_models.json

Results go to experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench_step import cpu_model  # experiments/ is the script's own folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
STANDIN = ROOT / "tests" / "timm_standin"

# timm's published SE-ResNet-50 / ResNet-50 training throughput ratio on GPU: the figure the issue
# quotes (timm's published figure), for comparison with the CPU ratios measured here.
TIMM_PUBLISHED_GPU_SE_RATIO = 0.865

LEARNING_RATE = 0.01
MOMENTUM = 0.9
NUM_CLASSES = 1000


def import_timm():
    """The installed timm; exits with one line when its torchvision cannot be imported beside this torch."""
    try:
        import timm
    except (ImportError, RuntimeError) as error:
        raise SystemExit(
            f"bench_models: `import timm` failed ({type(error).__name__}: {str(error).splitlines()[0]}); "
            f"on a CPU build of torch, run it as PYTHONPATH={STANDIN.relative_to(ROOT)} "
            f"{Path(sys.executable).name} experiments/bench_models.py ..."
        ) from None
    return timm


def attnjax_runner(name: str, images, labels):
    """A zero-argument callable running one blocking attnjax train step of ``name``; and its compile seconds."""
    import jax
    import optax

    from attnjax import models, xla_options
    from attnjax.train.step import create_train_state, train_step

    model = models.create(name, num_classes=NUM_CLASSES)
    tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
    state = create_train_state(jax.random.key(0), model, images.shape[1:], LEARNING_RATE, tx=tx)
    batch = jax.device_put({"image": images, "label": labels})
    step = jax.jit(train_step, donate_argnums=0, compiler_options=xla_options.compiler_options() or None)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    return run, compile_seconds


def timm_runner(name: str, images, labels, channels_last: bool):
    """A zero-argument callable running one timm (PyTorch eager) train step of ``name``."""
    import torch
    import torch.nn.functional as F

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).train()
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    y = torch.from_numpy(labels).long()
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def run():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return run


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="round-robin rounds; one timed step per variant each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant after compiling")
    parser.add_argument("--models", default="resnet50,seresnet50", help="comma-separated; plain first, SE second")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--channels-last", action="store_true", help="timm in channels-last memory format")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    from tqdm import tqdm

    timm = import_timm()
    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    path = [f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else []
    command = shlex.join([*path, Path(sys.executable).name, *sys.argv])
    header = {
        "command": command,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "timm_memory_format": "channels_last" if args.channels_last else "contiguous (NCHW)",
        "optimizer": f"SGD lr {LEARNING_RATE} momentum {MOMENTUM}",
    }
    print(f"$ {command}")
    print(
        f"jax {header['jax']} ({header['backend']}), torch {header['torch']} ({header['torch_threads']} threads), "
        f"timm {header['timm']}; CPU: {header['cpu']} (os.cpu_count() = {header['cpu_count']})"
    )
    print(
        f"batch {args.batch_size} x {args.image_size}x{args.image_size}x3 float32, {header['optimizer']}, "
        f"timm {header['timm_memory_format']}; {args.warmup} warm-up + {args.repeats} timed steps per variant",
        flush=True,
    )

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)

    runners, compile_seconds = {}, {}
    for name in names:  # attnjax first, then timm: the round-robin order
        runners[("attnjax", name)], compile_seconds[name] = attnjax_runner(name, images, labels)
        print(f"compiled attnjax {name} in {compile_seconds[name]:.1f} s", flush=True)
    for name in names:
        runners[("timm", name)] = timm_runner(name, images, labels, args.channels_last)

    for _ in tqdm(range(args.warmup), desc="warm-up", unit="round"):
        for run in runners.values():
            run()
    times = {key: [] for key in runners}
    for _ in tqdm(range(args.repeats), desc="timed", unit="round"):
        for key, run in runners.items():
            times[key].append(timed(run))

    rows = []
    for (framework, name), seconds in times.items():
        median = statistics.median(seconds)
        rows.append(
            {
                "framework": framework,
                "model": name,
                "median_seconds": median,
                "images_per_second": args.batch_size / median,
                "seconds": seconds,
                **({"compile_seconds": compile_seconds[name]} if framework == "attnjax" else {}),
            }
        )
    throughput = {(r["framework"], r["model"]): r["images_per_second"] for r in rows}

    print()
    print("| framework | model | median step s | images/s | min s | max s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['framework']} | {r['model']} | {r['median_seconds']:.3f} | {r['images_per_second']:.2f} "
            f"| {min(r['seconds']):.3f} | {max(r['seconds']):.3f} |"
        )

    se_ratios = {}
    if len(names) == 2:
        plain, se = names
        print()
        print(f"| framework | {se} / {plain} (throughput) | timm published (GPU) |")
        print("|---|---:|---:|")
        for framework in ("attnjax", "timm"):
            se_ratios[framework] = throughput[(framework, se)] / throughput[(framework, plain)]
            print(f"| {framework} | {se_ratios[framework]:.3f} | {TIMM_PUBLISHED_GPU_SE_RATIO:.3f} |")

    speed_ratios = {name: throughput[("attnjax", name)] / throughput[("timm", name)] for name in names}
    print()
    print("| model | attnjax / timm (throughput) |")
    print("|---|---:|")
    for name, ratio in speed_ratios.items():
        print(f"| {name} | {ratio:.3f} |")

    if args.json is not None:
        result = {
            **header,
            "rows": rows,
            "se_over_plain": se_ratios,
            "timm_published_gpu_se_over_plain": TIMM_PUBLISHED_GPU_SE_RATIO,
            "attnjax_over_timm": speed_ratios,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
