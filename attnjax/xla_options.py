"""XLA:CPU compiler options that attnjax applies, and where each can be applied.

Measured on a 2-core Xeon with jaxlib 0.10.2 (figures in experiments/RESULTS.md), the same
numbers to float32 rounding:

- ``xla_cpu_experimental_ynn_fusion_type = dot,reduce``: XLA:CPU hands convolutions, dots and
  reductions to YNNPACK by default, and YNNPACK runs this library's convolutions at 13-32% of
  the machine's peak where XLA's Eigen path reaches 36-63%. Keeping YNNPACK for dots and
  reductions only is the fastest mix (turning it off entirely is slower: Eigen is poor at
  the dense layers' input gradient).
- ``xla_cpu_copy_insertion_use_region_analysis = true``: removes the parameter copies that
  XLA otherwise inserts for donated train states.

Both only concern the CPU backend. There are two routes to XLA:

- ``jax.jit(..., compiler_options=compiler_options())``, per compiled function: what attnjax
  does wherever it compiles with ``jit`` (the jit step, the cost table, the benchmarks).
- ``XLA_FLAGS``, read once when JAX starts its backend: the only route for ``jax.pmap``. The
  CLI's entry point adds :func:`merge_xla_flags` to the environment before JAX starts;
  importing attnjax as a library never touches the environment.

The options are experimental, so each is checked against the installed jaxlib first and
left out where unknown (an unknown ``XLA_FLAGS`` entry aborts the process). A user's own
setting of an option, in ``XLA_FLAGS``, always wins over attnjax's.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import re
from pathlib import Path

# name -> (value for compiler_options, value for XLA_FLAGS, enum names the value needs)
OPTIONS: dict[str, tuple[object, str, tuple[str, ...]]] = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
        "dot,reduce",
        ("LIBRARY_FUSION_TYPE_DOT", "LIBRARY_FUSION_TYPE_REDUCE"),
    ),
    "xla_cpu_copy_insertion_use_region_analysis": (True, "true", ()),
}
MODES = ("tuned", "default")  # tuned: attnjax's options; default: XLA's own, for comparison


def user_flags(xla_flags: str | None = None) -> set[str]:
    """The option names set in ``XLA_FLAGS`` (the environment's unless given)."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    return set(re.findall(r"--([A-Za-z0-9_]+)", flags))


@functools.cache
def _jaxlib_binaries() -> tuple[Path, ...]:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(
        sorted(
            (path for folder in spec.submodule_search_locations for path in Path(folder).glob("*.so")),
            key=lambda path: -path.stat().st_size,  # the big library holds the flags; look there first
        )
    )


@functools.cache
def jaxlib_knows(*names: str) -> bool:
    """Whether one shared library of the installed jaxlib contains every string in ``names``.

    A check that needs no JAX backend (``XLA_FLAGS`` must be final before one starts): XLA's
    flag names and its options' enum names are stored as strings in jaxlib's library.
    """
    for path in _jaxlib_binaries():
        try:
            with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                if all(data.find(name.encode()) >= 0 for name in names):
                    return True
        except (OSError, ValueError):  # unreadable or empty file
            continue
    return False


def merge_xla_flags(xla_flags: str = "", mode: str = "tuned") -> str:
    """``xla_flags`` with attnjax's options appended, except those it sets itself or jaxlib lacks.

    Pure: the CLI writes the result to ``XLA_FLAGS`` before JAX starts.
    """
    if mode != "tuned":
        return xla_flags
    own = user_flags(xla_flags)
    extra = [
        f"--{name}={flag_value}"
        for name, (_, flag_value, enums) in OPTIONS.items()
        if name not in own and jaxlib_knows(name, *enums)
    ]
    return " ".join([xla_flags.strip(), *extra]).strip()


def backend_started() -> bool:
    """Whether JAX has started a backend in this process (``XLA_FLAGS`` is read then, and never again)."""
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # a private API: when it moves, assume not started
        return False


def configure_xla_flags(mode: str = "tuned") -> None:
    """Add attnjax's XLA:CPU options to ``XLA_FLAGS`` (the user's own settings win), if no backend started yet.

    ``jax.pmap`` takes no compiler options: ``XLA_FLAGS``, read when JAX starts its backend, is
    its only route. Only the entry points (``python -m attnjax.train``, ``python -m attnjax.compare``)
    call this; importing attnjax never touches the environment.
    """
    if not backend_started():
        os.environ["XLA_FLAGS"] = merge_xla_flags(os.environ.get("XLA_FLAGS", ""), mode)


@functools.cache
def _accepted(name: str, value: object) -> bool:
    """Whether this jaxlib's CPU compiler accepts option ``name`` set to ``value`` (one tiny compile)."""
    import jax
    import jax.numpy as jnp

    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(jnp.zeros(1)).compile()
    except Exception:  # noqa: BLE001 - an unknown option or value is a JaxRuntimeError (INVALID_ARGUMENT)
        return False
    return True


def compiler_options(mode: str = "tuned", backend: str | None = None) -> dict[str, object]:
    """The ``compiler_options`` for ``jax.jit`` on ``backend`` (the default backend unless given).

    Empty off CPU and in ``default`` mode. Leaves out options this jaxlib does not accept, and
    those set in ``XLA_FLAGS`` (the user's value wins; a value there already applies).
    """
    import jax

    if mode != "tuned" or (backend or jax.default_backend()) != "cpu":
        return {}
    own = user_flags()
    return {name: value for name, (value, _, _) in OPTIONS.items() if name not in own and _accepted(name, value)}


def applied(mode: str = "tuned") -> dict[str, str]:
    """The options in effect for a run, as ``XLA_FLAGS`` would spell them: what ``config.json`` records.

    Options from ``XLA_FLAGS`` (attnjax's own via the CLI, or the user's) and those added per
    compiled function. Empty off CPU.
    """
    import jax

    if jax.default_backend() != "cpu":
        return {}
    from_env = dict(re.findall(r"--(xla_cpu_[A-Za-z0-9_]+)=(\S*)", os.environ.get("XLA_FLAGS", "")))
    per_function = {name: OPTIONS[name][1] for name in compiler_options(mode)}
    return {**per_function, **from_env}
