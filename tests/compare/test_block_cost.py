"""The block cost table (``python -m attnjax.compare.block_cost``) on a tiny input."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from attnjax import blocks, ops
from attnjax.blocks import __main__ as blocks_command
from attnjax.compare import block_cost as cost
from attnjax.compare import measure

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def costs():
    return cost.measure(["se", "coord", "simam"], channels=8, height=4, width=4, batch=2, repeats=3, progress=False)


def test_rows_params_flops_and_times(costs):
    assert [c.name for c in costs] == ["identity", "se", "coord", "simam"]
    x = jnp.zeros((2, 4, 4, 8))
    for c in costs[1:]:
        variables = blocks.create(c.name).init(jax.random.key(0), x)
        expected = sum(a.size for a in jax.tree_util.tree_leaves(variables.get("params", {})))
        assert c.params == expected
        assert 0 < c.forward_flops < c.train_flops
        assert len(c.times_s) == 3 and all(t > 0 for t in c.times_s)
    identity = costs[0]
    assert identity.params == 0 and identity.forward_flops == 0
    assert costs[3].params == 0  # simam


def test_train_step_returns_gradients_and_new_batch_stats():
    block = blocks.create("coord")
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    variables = block.init(jax.random.key(1), x)
    (d_params, d_x), new_stats = cost.train_step_fn(block, variables)(variables["params"], x)
    assert jax.tree_util.tree_structure(d_params) == jax.tree_util.tree_structure(variables["params"])
    assert d_x.shape == x.shape
    assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(variables["batch_stats"])
    assert not jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)), new_stats, variables["batch_stats"])
    )


def test_tables(costs):
    text = cost.format_table(costs).splitlines()
    assert text[0].split() == "block params fwd MFLOP fwd+bwd MFLOP fwd+bwd ms IQR ms vs identity vs FLOPs".split()
    assert text[2].split()[0] == "identity" and text[2].split()[-1] == "1.00"  # no FLOP ratio for the baseline
    markdown = cost.format_table(costs, markdown=True).splitlines()
    assert markdown[0].startswith("| block | params |") and markdown[1].startswith("|---|---:|")
    assert len(markdown) == 2 + len(costs)


def test_cli_rejects_unknown_blocks_and_bad_sizes(capsys):
    with pytest.raises(SystemExit) as error:
        cost.main(["--blocks", "se,sse"])
    assert error.value.code == 2
    assert "unknown block(s) sse" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cost.main(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err


def _row(name, flops, ms):
    return cost.Cost(name, 0, flops, flops, (ms / 1e3,))


def test_flop_time_ratio_is_own_time_over_flop_proportional_time_at_the_median_rate():
    rows = [
        _row("identity", 1e6, 1.0),  # the baseline's FLOPs and time are subtracted from every row
        _row("a", 11e6, 2.0),  # own: 10 MFLOP in 1 ms
        _row("b", 21e6, 3.0),  # own: 20 MFLOP in 2 ms
        _row("slow", 11e6, 21.0),  # own: 10 MFLOP in 20 ms, the pathology
        _row("free", 1e6, 1.0),  # no own FLOPs or time: no ratio
    ]
    ratios = cost.flop_time_ratios(rows)
    assert ratios[0] is None and ratios[4] is None
    # Rates 10, 10 and 0.5 GFLOP/s: the median, 10, is the scale; one slow block does not move it.
    assert ratios[1:4] == pytest.approx([1.0, 1.0, 20.0])
    assert cost.format_table(rows).splitlines()[5].split()[-1] == "20.00"
    assert cost.flop_time_ratios([_row("identity", None, 1.0), _row("a", None, 2.0)]) == [None, None]


def test_flops_count_the_blocks_math_not_a_cpu_formulations():
    # sk's CPU formulation runs dense block-diagonal convs: G = 32 times its grouped convs' FLOPs at C = 64.
    (_, sk_cost) = cost.measure(["sk"], channels=64, height=8, width=8, batch=2, repeats=1, progress=False)
    block = blocks.create("sk")
    x = jnp.ones((2, 8, 8, 64))
    variables = block.init(jax.random.key(0), x)
    with ops.use_formulations(grouped_conv="block_diagonal"):
        step = jax.jit(cost.train_step_fn(block, variables)).lower(variables["params"], x).compile()
    assert sk_cost.train_flops < measure.flops_of(step) / 4


def test_the_command_runs_and_bad_input_is_a_one_line_error():
    def run(*args):
        command = [sys.executable, "-m", "attnjax.compare.block_cost", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)

    ok = run("--blocks", "se", "--repeats", "1", "--channels", "8", "--height", "4", "--width", "4", "--no-progress")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "N=8, H=4, W=4, C=8" in ok.stdout.splitlines()[0]
    assert [line.split()[0] for line in ok.stdout.splitlines()[3:]] == ["identity", "se"]
    for args, message in ((["--blocks", "sse"], "unknown block(s) sse"), (["--channels", "0"], "--channels must be")):
        bad = run(*args)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


# --- python -m attnjax.blocks: the library's own command, the blocks' options --------------------


def test_options_lists_every_blocks_options_and_defaults(capsys):
    assert blocks_command.main(["--options", "--blocks", "cbam,softmax"]) == 0
    assert capsys.readouterr().out.splitlines() == ["cbam: reduction=16, kernel_size=7", "softmax: (none)"]
    assert blocks_command.main(["--blocks", "cbam,softmax"]) == 0  # the listing is all the command does
    assert capsys.readouterr().out.splitlines() == ["cbam: reduction=16, kernel_size=7", "softmax: (none)"]
    assert blocks_command.main([]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(blocks.names())


def test_blocks_command_rejects_unknown_blocks_and_points_to_the_cost_table(capsys):
    with pytest.raises(SystemExit) as error:
        blocks_command.main(["--blocks", "se,sse"])
    assert error.value.code == 2 and "unknown block(s) sse" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:
        blocks_command.main(["--markdown"])  # the cost table's flag: it has its own command now
    assert error.value.code == 2 and "python -m attnjax.compare.block_cost" in capsys.readouterr().err
