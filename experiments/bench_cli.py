"""Training through the CLI, as a user runs it, against PyTorch eager train steps: the loop included.

Makes folder datasets of random RGB images (8x8 and 32x32 by default), then per round and
size runs, one process after the other:

    attnjax          python -m attnjax.train --dataset folder:DIR --epochs 3 (every other option
                     at its default: AttentionNet + seed, batch 128, pmap, float32, XLA options tuned);
                     the figure is the median images/s of epochs 2-3 from metrics.jsonl, which
                     counts the whole loop: input pipeline, transfers, progress, metrics, checkpoints
    attnjax default  the same with --xla-options default
    torch            the tutorial's PyTorch train step (NCHW, default Adam) on a fixed batch: batch
                     size over the mean step time (as an epoch counts it), no data loading (its
                     most favourable case)
    torch best       the same with channels_last + Adam(foreach=True) or foreach alone, the faster

    python experiments/bench_cli.py                      # 8 and 32, 2 rounds
    python experiments/bench_cli.py --sizes 32 --rounds 3 --train-images 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_step import cpu_model  # experiments/ is the script's own folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]


def make_folder(root: Path, size: int, train_images: int, test_images: int, classes: int = 10) -> Path:
    """``root/{train,test}/<class>/*.png`` of random RGB ``size x size`` images."""
    from PIL import Image

    rng = np.random.default_rng(size)
    for split, count in (("train", train_images), ("test", test_images)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def run_attnjax(dataset: Path, workdir: Path, epochs: int, extra: list[str]) -> float:
    command = [sys.executable, "-m", "attnjax.train", f"--dataset=folder:{dataset}", f"--epochs={epochs}"]
    command += [f"--workdir={workdir}", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(line["images_per_second"] for line in lines[1:])  # epoch 1 compiles


def torch_worker(size: int, batch: int, steps: int, warmup: int) -> dict:
    """Median images/s of the tutorial's PyTorch step and of its best variant, alternated in this process."""
    import torch
    import torch.nn.functional as F
    from bench_step import alternate

    from attnjax.compare.pytorch import TorchAttentionNet

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(0, 1, (batch, 3, size, size)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, batch)).long()

    def runner(channels_last: bool, foreach: bool | None):
        torch.manual_seed(0)
        model = TorchAttentionNet(3, (size, size), num_classes=10, block="seed")
        x = images
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)

        def run():
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()
            optimizer.step()

        return run

    # The mean, not the median: attnjax's figure is an epoch's images over its seconds, slow steps included.
    seconds = alternate(
        {"torch": runner(False, None), "foreach": runner(False, True), "channels_last": runner(True, True)},
        steps,
        warmup,
        average=statistics.mean,
    )
    return {"torch": batch / seconds["torch"], "best": batch / min(seconds["foreach"], seconds["channels_last"])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-images", type=int, default=0, help="per size; 0: about 4 s an epoch at 8 and 32")
    parser.add_argument("--steps", type=int, default=40, help="PyTorch steps timed per process")
    parser.add_argument("--torch-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_worker:
        print(json.dumps(torch_worker(args.torch_worker, 128, args.steps, 5)))
        return

    print(f"{cpu_model()}; AttentionNet + seed, batch 128, float32; {args.rounds} rounds", flush=True)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets = {
            size: make_folder(tmp / f"data{size}", size, args.train_images or (8192 if size <= 16 else 2560), 256)
            for size in args.sizes
        }
        for round_ in range(args.rounds):
            for size in args.sizes:
                row = results.setdefault(size, {"attnjax": [], "attnjax default": [], "torch": [], "best": []})
                row["attnjax"].append(run_attnjax(datasets[size], tmp / f"run{size}-{round_}", args.epochs, []))
                torch_ips = json.loads(
                    subprocess.run(
                        [sys.executable, __file__, f"--torch-worker={size}", f"--steps={args.steps}"],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout.splitlines()[-1]
                )
                row["torch"].append(torch_ips["torch"])
                row["best"].append(torch_ips["best"])
                row["attnjax default"].append(
                    run_attnjax(
                        datasets[size], tmp / f"run{size}-{round_}-default", args.epochs, ["--xla-options=default"]
                    )
                )
                print(
                    f"  round {round_ + 1}, {size}x{size}: { ({k: round(v[-1]) for k, v in row.items()}) }", flush=True
                )

    print("images/s, median over rounds; ratios: attnjax through the CLI over the PyTorch step, per round, the median")
    columns = ("attnjax", "default", "torch", "best", "/torch", "/best", "default/torch")
    print(f"{'input':>9} " + " ".join(f"{c:>{max(len(c), 7)}}" for c in columns))
    for size, row in results.items():
        m = {k: statistics.median(v) for k, v in row.items()}

        def ratio(a, b, row=row):
            return statistics.median(x / y for x, y in zip(row[a], row[b], strict=True))

        print(
            f"{size:>3}x{size:<3}x3 {m['attnjax']:>7,.0f} {m['attnjax default']:>7,.0f} {m['torch']:>7,.0f} "
            f"{m['best']:>7,.0f} {ratio('attnjax', 'torch'):>6.2f}x {ratio('attnjax', 'best'):>6.2f}x "
            f"{ratio('attnjax default', 'torch'):>12.2f}x"
        )


if __name__ == "__main__":
    main()
