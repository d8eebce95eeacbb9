"""Train-step throughput: attnjax's AttentionNet against PyTorch eager, as the tutorial wrote it and at its best.

Each run is a pair of processes per round, one with attnjax's XLA:CPU options
(``--xla-options tuned``, the CLI's default) and one without (``default``), alternated over
rounds. Inside each process, steps alternate between the variants on the same weights and
batches, so machine noise hits them alike; each figure is the median over the timed steps:

    attnjax      the CLI's own path: the default wrapper (pmap over the local devices), donated
                 state, a host batch transferred per step, XLA_FLAGS set as the CLI sets them
    jit          jax.jit of the same step with the options as compiler_options
    torch        PyTorch as the tutorial wrote it: NCHW, torch.optim.Adam's defaults (on CPU
                 the per-tensor loop)
    torch best   the faster, per size, of Adam(foreach=True) and channels_last + foreach

MFU is the step's FLOPs (XLA's cost analysis) over its time, against a float32 matmul peak
measured in the same process (the best of jnp.dot and torch.mm). ``--per-op`` adds each
layer's forward + backward alone in both frameworks.

    python experiments/bench_step.py                         # 8x8x3 and 32x32x3, batch 128, 2 rounds
    python experiments/bench_step.py --sizes 32 --steps 40 --block softmax --per-op

Needs torch (pip install torch==2.13.0, as the `dev` extra does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runners: dict, steps: int, warmup: int, average=statistics.median) -> dict[str, float]:
    """Seconds per call of each runner (``average`` over the timed calls), the runners called in turn."""
    times = {name: [] for name in runners}
    for i in range(warmup + steps):
        for name, runner in runners.items():
            seconds = timed(runner)
            if i >= warmup:
                times[name].append(seconds)
    return {name: average(t) for name, t in times.items()}


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best float32 n x n matmul here, JAX or PyTorch (the MFU's denominator)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    dot = jax.jit(jnp.dot)
    dot(ja, ja).block_until_ready()
    seconds = alternate({"jax": lambda: dot(ja, ja).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}, repeats, 2)
    return 2 * n**3 / min(seconds.values())


def per_op(size: int, batch: int, compiler_options: dict, steps: int) -> list[dict]:
    """Forward + backward (input and weight gradients) of each conv and dense layer alone, JAX vs PyTorch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    inner = size // 2 if size > 8 else size  # AttentionNet pools to 8 after conv1 when larger
    layers = [
        ("conv1 3x3", (batch, size, size, 3), 64),
        ("conv2 3x3", (batch, inner, inner, 64), 128),
        ("fc1", (batch, 128 * 8 * 8), 512),
        ("fc2", (batch, 512), 10),
    ]
    rows = []
    for name, shape, out in layers:
        x = rng.standard_normal(shape, dtype=np.float32)
        conv = len(shape) == 4
        w = rng.standard_normal((3, 3, shape[-1], out) if conv else (shape[-1], out), dtype=np.float32) * 0.1

        def loss(x, w, conv=conv):
            if conv:
                y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            else:
                y = x @ w
            return jnp.sum(y * y)

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=compiler_options or None)
        jx, jw = jnp.asarray(x), jnp.asarray(w)
        flops = grad.lower(jx, jw).compile().cost_analysis()["flops"]
        tx = torch.from_numpy(x)
        if conv:
            tx = tx.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
            tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        else:
            tx = tx.requires_grad_()
            tw = torch.from_numpy(w).T.contiguous()
        tw.requires_grad_()

        def run_jax(grad=grad, jx=jx, jw=jw):
            jax.block_until_ready(grad(jx, jw))

        def run_torch(tx=tx, tw=tw, conv=conv):
            y = F.conv2d(tx, tw, padding=1) if conv else F.linear(tx, tw)
            torch.autograd.grad((y * y).sum(), (tx, tw))

        run_jax()
        seconds = alternate({"jax": run_jax, "torch": run_torch}, steps, 3)
        rows.append({"op": name, "flops": flops, **{k + "_seconds": v for k, v in seconds.items()}})
    return rows


def child(args) -> dict:
    """One process: the variants of one size, alternated; returns medians as a dict."""
    from attnjax import xla_options

    xla_options.configure_xla_flags(args.xla_options)  # as the CLI does, before JAX starts its backend

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from attnjax import models, xla_options
    from attnjax.compare.pytorch import TorchAttentionNet, flax_to_torch_state, nhwc_to_nchw
    from attnjax.train import Config, create_train_state, parallel, train_step

    size, batch = args.size, args.batch_size
    image_shape = (size, size, 3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (batch, *image_shape)).astype(np.float32)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    host_batch = {"image": images, "label": labels}

    net = models.create("attention_net", num_classes=10, block=args.block)
    state = create_train_state(jax.random.key(0), net, image_shape, 1e-3)
    options = xla_options.compiler_options(args.xla_options)

    kind = Config.parallel  # the CLI's default wrapper
    devices = parallel.devices_for(kind)
    cli_step = parallel.wrap_step(train_step, devices, kind, donate_state=True, compiler_options=options)
    cli_state = parallel.replicate(state, devices)
    jit_step = jax.jit(train_step, donate_argnums=0, compiler_options=options or None)
    jit_state = jax.tree.map(jnp.array, state)  # each path donates its own copy
    jit_batch = jax.device_put(host_batch)
    flops = jax.jit(train_step).lower(state, jit_batch).compile().cost_analysis()["flops"]

    def run_cli():
        nonlocal cli_state
        cli_state, metrics = cli_step(cli_state, parallel.put_batch(host_batch, devices, kind))
        jax.block_until_ready(metrics)

    def run_jit():
        nonlocal jit_state
        jit_state, metrics = jit_step(jit_state, jit_batch)
        jax.block_until_ready(metrics)

    torch_labels = torch.from_numpy(labels).long()

    def torch_runner(channels_last: bool, foreach: bool | None):
        model = TorchAttentionNet(3, (size, size), num_classes=10, block=None if args.block == "none" else args.block)
        model.load_state_dict(flax_to_torch_state(state.params, model.final_size))
        x = nhwc_to_nchw(images)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=foreach)

        def run():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), torch_labels)
            loss.backward()
            optimizer.step()
            loss.item()

        return run

    runners = {
        "attnjax": run_cli,
        "jit": run_jit,
        "torch": torch_runner(False, None),  # the tutorial: torch.optim.Adam's default on CPU is the loop
        "torch foreach": torch_runner(False, True),
        "torch channels_last foreach": torch_runner(True, True),
    }
    first = {name: timed(run) for name, run in runners.items()}  # traces and compiles
    median = alternate(runners, args.steps, args.warmup)
    result = {
        "size": size,
        "xla_options": args.xla_options,
        "applied": xla_options.applied(args.xla_options),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "step_flops": flops,
        "peak_flops": matmul_peak(),
        "seconds": median,
        "compile_seconds": {k: first[k] - median[k] for k in ("attnjax", "jit")},
    }
    if args.per_op:
        result["per_op"] = per_op(size, batch, options, args.steps)
    return result


def summarise(results: list[dict], batch: int) -> None:
    sizes = sorted({r["size"] for r in results})
    r0 = results[0]
    peak = statistics.median(r["peak_flops"] for r in results)
    print(f"matmul peak (float32, best of jnp.dot and torch.mm): {peak / 1e9:.0f} GFLOP/s")
    header = (
        f"{'input':>9} {'options':>8} {'attnjax':>8} {'jit':>7} {'torch':>7} {'best':>7} "
        f"{'/torch':>7} {'/best':>6} {'jit/torch':>9} {'MFU':>5} {'torch MFU':>9}  best torch"
    )
    print("img/s, median over rounds of per-process medians; ratios are within each process, then the median")
    print(header)
    summary = {}
    for size in sizes:
        for mode in ("tuned", "default"):
            rows = [r for r in results if r["size"] == size and r["xla_options"] == mode]
            if not rows:
                continue

            def med(fn, rows=rows):
                return statistics.median(fn(r) for r in rows)

            def best_name(r):
                return min(("torch foreach", "torch channels_last foreach"), key=r["seconds"].get)

            ips = {k: med(lambda r, k=k: batch / r["seconds"][k]) for k in ("attnjax", "jit", "torch")}
            ips_best = med(lambda r: batch / r["seconds"][best_name(r)])
            vs_torch = med(lambda r: r["seconds"]["torch"] / r["seconds"]["attnjax"])
            vs_best = med(lambda r: r["seconds"][best_name(r)] / r["seconds"]["attnjax"])
            jit_torch = med(lambda r: r["seconds"]["torch"] / r["seconds"]["jit"])
            mfu = med(lambda r: r["step_flops"] / r["seconds"]["attnjax"] / r["peak_flops"])
            torch_mfu = med(lambda r: r["step_flops"] / r["seconds"][best_name(r)] / r["peak_flops"])
            summary[size, mode] = vs_torch
            print(
                f"{size:>3}x{size:<3}x3 {mode:>8} {ips['attnjax']:>8,.0f} {ips['jit']:>7,.0f} {ips['torch']:>7,.0f} "
                f"{ips_best:>7,.0f} {vs_torch:>6.2f}x {vs_best:>5.2f}x {jit_torch:>8.2f}x {mfu:>5.0%} {torch_mfu:>9.0%}"
                f"  {best_name(rows[0]).removeprefix('torch ')}",
                flush=True,
            )
        if (size, "tuned") in summary and (size, "default") in summary:
            print(
                f"{'':>9} options: attnjax/torch {summary[size, 'tuned'] / summary[size, 'default']:.2f}x "
                "that of the process without them"
            )
    print(f"tuned applies: {r0['applied'] if r0['xla_options'] == 'tuned' else '(see a tuned row)'}")
    ops_rows = [r for r in results if "per_op" in r and r["xla_options"] == "tuned"]
    if ops_rows:
        print("\nper op, forward + backward alone (tuned process), ms and % of the matmul peak:")
        print(f"{'input':>9} {'op':>10} {'jax ms':>8} {'torch ms':>9} {'jax/torch':>10} {'jax %':>6} {'torch %':>8}")
        for size in sizes:
            rows = [r for r in ops_rows if r["size"] == size]
            for i, op in enumerate(rows[0]["per_op"] if rows else []):

                def med(key, rows=rows, i=i):
                    return statistics.median(r["per_op"][i][key] for r in rows)

                peak = statistics.median(r["peak_flops"] for r in rows)
                js, ts = med("jax_seconds"), med("torch_seconds")
                print(
                    f"{size:>3}x{size:<3}x3 {op['op']:>10} {js * 1e3:>8.2f} {ts * 1e3:>9.2f} {ts / js:>9.2f}x "
                    f"{op['flops'] / js / peak:>6.0%} {op['flops'] / ts / peak:>8.0%}"
                )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="square input sizes (3 channels)")
    parser.add_argument("--block", default="seed", help="attention block: none, seed or softmax")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (median taken)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    parser.add_argument("--rounds", type=int, default=2, help="pairs of processes (tuned, default) per size")
    parser.add_argument("--per-op", action="store_true", help="also time each layer alone in both frameworks")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--xla-options", default="tuned", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return
    import jax
    import torch

    print(
        f"{cpu_model()}; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"AttentionNet + {args.block}, batch {args.batch_size}, float32, median of {args.steps} steps after "
        f"{args.warmup} warm-up, {args.rounds} round(s) of (tuned, default) processes",
        flush=True,
    )
    results = []
    for round_ in range(args.rounds):
        for size in args.sizes:
            for mode in ("tuned", "default"):
                command = [
                    sys.executable,
                    __file__,
                    "--child",
                    f"--size={size}",
                    f"--xla-options={mode}",
                    f"--block={args.block}",
                    f"--batch-size={args.batch_size}",
                    f"--steps={args.steps}",
                    f"--warmup={args.warmup}",
                ] + (["--per-op"] if args.per_op and round_ == 0 else [])
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                print(f"  round {round_ + 1}, {size}x{size}, {mode}: done", file=sys.stderr, flush=True)
    summarise(results, args.batch_size)


if __name__ == "__main__":
    main()
