"""Capacity and durability planning for a DeepFS cluster: pure model code, no I/O.

``deepfs capacity-plan`` (``deepfs_cli.capacity_plan``) is the shell; this
package is the model, in layers:
- ``_units``: quantities as operators type them (175B, 2GB/s, 1000qps, 30min, 16TiB);
- ``_workload``: checkpoint sizes (weights, gradients, optimizer state) and the
  bandwidths a training/inference workload needs;
- ``_durability``: the Markov chain of a stripe group's failures and repairs,
  solved exactly, in closed form and by Monte-Carlo simulation;
- ``_bench``: per-node figures from a ``deepfs bench`` results document;
- ``_plan``: nodes, disks, raw/usable capacity and durability per layout.
docs/CAPACITY.md explains the model and where its assumptions stop holding.
"""

from deepfs.capacity._bench import BenchError, BenchFigures, figures_from_bench
from deepfs.capacity._durability import (
    HOURS_PER_YEAR,
    MonteCarloEstimate,
    StripeChain,
    annual_rate_from_afr,
    effective_groups,
    expected_transitions,
    loss_probability,
    mttdl_closed_form_h,
    mttdl_exact_h,
    nines,
    simulate_mttdl_h,
)
from deepfs.capacity._plan import (
    ASSUMPTIONS,
    DEFAULT_LAYOUTS,
    Durability,
    Hardware,
    LayoutPlan,
    Plan,
    Redundancy,
    durability,
    durability_curve,
    parse_redundancy,
    plan,
)
from deepfs.capacity._units import (
    Rate,
    UnitError,
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    parse_bandwidth,
    parse_duration,
    parse_fraction,
    parse_model_size,
    parse_rate,
    parse_size,
)
from deepfs.capacity._workload import (
    OPTIMIZERS,
    PRECISIONS,
    CheckpointPart,
    CheckpointSize,
    Demand,
    Workload,
    checkpoint_size,
    demand,
)

__all__ = [
    "ASSUMPTIONS",
    "DEFAULT_LAYOUTS",
    "HOURS_PER_YEAR",
    "OPTIMIZERS",
    "PRECISIONS",
    "BenchError",
    "BenchFigures",
    "CheckpointPart",
    "CheckpointSize",
    "Demand",
    "Durability",
    "Hardware",
    "LayoutPlan",
    "MonteCarloEstimate",
    "Plan",
    "Rate",
    "Redundancy",
    "StripeChain",
    "UnitError",
    "Workload",
    "annual_rate_from_afr",
    "checkpoint_size",
    "demand",
    "durability",
    "durability_curve",
    "effective_groups",
    "expected_transitions",
    "figures_from_bench",
    "format_bytes",
    "format_count",
    "format_duration",
    "format_rate",
    "loss_probability",
    "mttdl_closed_form_h",
    "mttdl_exact_h",
    "nines",
    "parse_bandwidth",
    "parse_duration",
    "parse_fraction",
    "parse_model_size",
    "parse_rate",
    "parse_redundancy",
    "parse_size",
    "plan",
    "simulate_mttdl_h",
]
