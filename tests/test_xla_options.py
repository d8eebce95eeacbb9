"""attnjax's XLA:CPU options: the same training numbers, unknown options skipped, the user's XLA_FLAGS winning."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import models, xla_options
from attnjax.train import create_train_state, train_step

YNN = "xla_cpu_experimental_ynn_fusion_type"
REGION = "xla_cpu_copy_insertion_use_region_analysis"


@pytest.fixture(autouse=True)
def xla_flags_without_attnjax_options(monkeypatch):
    """XLA_FLAGS as conftest set it: a test that ran ``cli.main`` in this process may have added the options."""
    flags = os.environ.get("XLA_FLAGS", "")
    kept = " ".join(flag for flag in flags.split() if flag.lstrip("-").split("=")[0] not in xla_options.OPTIONS)
    monkeypatch.setenv("XLA_FLAGS", kept)


def test_this_jaxlib_accepts_both_options():
    # If a jaxlib upgrade drops one, this fails: the figures in RESULTS.md then need re-measuring.
    assert xla_options.compiler_options() == {name: value for name, (value, _, _) in xla_options.OPTIONS.items()}
    assert xla_options.compiler_options("default") == {}
    assert xla_options.compiler_options(backend="gpu") == {}


def test_three_steps_with_the_options_match_three_without():
    net = models.create("attention_net", num_classes=10, block="seed")
    # Adam turns float32 rounding in a near-zero gradient into an update of up to the learning rate
    # (its m / sqrt(v) is then +-1 either way), so parameters agree to about lr: 1e-4 keeps that under 1e-5.
    state = create_train_state(jax.random.key(0), net, (16, 16, 3), 1e-4)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.uniform(0, 1, (32, 16, 16, 3)).astype(np.float32), "label": rng.integers(0, 10, 32)}
        for _ in range(3)
    ]
    results = []
    for options in (xla_options.compiler_options(), None):
        assert options != {}
        step = jax.jit(train_step, compiler_options=options)
        s, losses = state, []
        for batch in batches:
            s, metrics = step(s, batch)
            losses.append(float(metrics["loss"]))
        results.append((s.params, losses))
    (tuned, tuned_losses), (plain, plain_losses) = results
    np.testing.assert_allclose(tuned_losses, plain_losses, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_option_this_jaxlib_does_not_know_is_left_out(monkeypatch):
    bogus = "xla_cpu_attnjax_no_such_option"
    monkeypatch.setitem(xla_options.OPTIONS, bogus, (True, "true", ()))
    options = xla_options.compiler_options()
    assert bogus not in options and YNN in options
    assert float(jax.jit(lambda x: x + 1, compiler_options=options)(jnp.ones(()))) == 2.0
    flags = xla_options.merge_xla_flags("")
    assert bogus not in flags and f"--{YNN}=dot,reduce" in flags
    # A value this jaxlib lacks (an enum name) is left out too: in XLA_FLAGS it would abort the process.
    monkeypatch.setitem(xla_options.OPTIONS, YNN, ("LIBRARY_FUSION_TYPE_NOPE", "nope", ("LIBRARY_FUSION_TYPE_NOPE",)))
    assert YNN not in xla_options.merge_xla_flags("") and YNN not in xla_options.compiler_options()
    # The merged flags start a real JAX process.
    monkeypatch.undo()
    env = {**os.environ, "XLA_FLAGS": xla_options.merge_xla_flags("")}
    proc = subprocess.run(
        [sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr


def test_the_users_own_setting_wins():
    user = f"--xla_force_host_platform_device_count=2 --{REGION}=false"
    merged = xla_options.merge_xla_flags(user)
    assert merged.startswith(user)
    assert merged.count(REGION) == 1 and f"--{YNN}=dot,reduce" in merged
    assert xla_options.merge_xla_flags(user, "default") == user


def test_compiler_options_leave_the_users_xla_flags_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=dot")
    assert YNN not in xla_options.compiler_options() and REGION in xla_options.compiler_options()


def test_the_cli_entry_sets_xla_flags_before_jax_starts_and_the_user_wins():
    """A fresh process, as ``python -m attnjax.train`` starts: XLA_FLAGS is set, the user's value kept, and used."""
    script = (
        "import json, os\n"
        "from attnjax import xla_options\n"
        "xla_options.configure_xla_flags('tuned')\n"
        "import jax.numpy as jnp\n"
        "jnp.ones(1).block_until_ready()\n"
        "print(json.dumps({'flags': os.environ['XLA_FLAGS'], 'applied': xla_options.applied()}))\n"
    )
    env = {**os.environ, "XLA_FLAGS": f"--{YNN}=dot", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["flags"] == f"--{YNN}=dot --{REGION}=true"
    assert out["applied"] == {YNN: "dot", REGION: "true"}


def test_a_started_backend_is_not_reconfigured(monkeypatch):
    jnp.ones(1).block_until_ready()  # the test process's backend is running
    assert xla_options.backend_started()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    xla_options.configure_xla_flags("tuned")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"


@pytest.mark.parametrize("mode", ["fast", ""])
def test_an_unknown_mode_is_a_one_line_error(tmp_path, mode):
    proc = subprocess.run(
        [sys.executable, "-m", "attnjax.train", f"--xla-options={mode}", f"--workdir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "tuned" in proc.stderr and "Traceback" not in proc.stderr
