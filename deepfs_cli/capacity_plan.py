"""``deepfs capacity-plan``: how many storage nodes a workload needs, and how durable its data will be.

The shell over ``deepfs.capacity`` (the model): it parses the options into
the model's dataclasses, reads ``--from-bench``, and renders the plan as
rich tables, as ``--json``, or as a ``--plot`` of durability against layout
and node count. docs/CAPACITY.md explains every figure.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from deepfs.capacity import (
    DEFAULT_LAYOUTS,
    HOURS_PER_YEAR,
    OPTIMIZERS,
    PRECISIONS,
    BenchError,
    BenchFigures,
    Hardware,
    LayoutPlan,
    Plan,
    UnitError,
    Workload,
    durability_curve,
    figures_from_bench,
    format_bytes,
    format_count,
    format_duration,
    format_rate,
    parse_bandwidth,
    parse_duration,
    parse_fraction,
    parse_model_size,
    parse_rate,
    parse_redundancy,
    parse_size,
    plan,
)

__all__ = ["capacity_plan", "render", "write_plot"]

MiB = float(1 << 20)


class _Quantity(click.ParamType):
    """A click type over one of ``deepfs.capacity``'s parsers: bad text becomes a usage error naming the option."""

    def __init__(self, name: str, parser: Callable[[str], Any]) -> None:
        self.name = name
        self.parser = parser

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parser(value)
        except (UnitError, ValueError) as exc:
            self.fail(str(exc), param, ctx)


MODEL_SIZE = _Quantity("model size", parse_model_size)
RATE = _Quantity("throughput", parse_rate)
BANDWIDTH = _Quantity("bandwidth", parse_bandwidth)
SIZE = _Quantity("size", parse_size)
DURATION = _Quantity("duration", parse_duration)
FRACTION = _Quantity("fraction", parse_fraction)
LAYOUT = _Quantity("layout", parse_redundancy)


@click.command("capacity-plan")
@click.option("--model-size", type=MODEL_SIZE, required=True, help="parameters: 175B, 70B, 1.5T, 7e9")
@click.option("--throughput", type=RATE, help="data loading: requests (1000qps, × --sample-size) or bandwidth (2GB/s)")
@click.option("--sample-size", type=SIZE, default="1MiB", show_default=True, help="bytes per request of --throughput")
@click.option("--dataset-size", type=SIZE, default="0", help="training data stored on DeepFS [default: none]")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="bf16", show_default=True)
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="adam", show_default=True)
@click.option("--master-weights/--no-master-weights", default=None,
              help="fp32 master copy of the weights [default: when --precision is below fp32]")
@click.option("--gradients/--no-gradients", default=True, show_default=True,
              help="count gradients in the checkpoint (ZeRO's 16 B/param for bf16+Adam; without: 14)")
@click.option("--checkpoint-interval", type=DURATION, default="30min", show_default=True)
@click.option("--checkpoint-time", type=DURATION, default="5min", show_default=True,
              help="the time one checkpoint may take to write")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--ranks", type=click.IntRange(min=1), help="training ranks writing shards (per-rank figures)")
@click.option("--inference-replicas", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--inference-precision", type=click.Choice(list(PRECISIONS)),
              help="precision of the served weights [default: --precision]")
@click.option("--model-load-time", type=DURATION, default="1min", show_default=True,
              help="the time in which all replicas load the weights")
@click.option("--nodes", type=click.IntRange(min=1), help="plan for this many storage nodes [default: as needed]")
@click.option("--disks-per-node", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--disk-size", type=SIZE, default="7.68TB", show_default=True)
@click.option("--disk-bw", type=BANDWIDTH, default="2GB/s", show_default=True, help="bandwidth of one disk")
@click.option("--net-bw", type=BANDWIDTH, default="100Gbit/s", show_default=True, help="network bandwidth per node")
@click.option("--fill", type=FRACTION, default="80%", show_default=True, help="fill no disk beyond this")
@click.option("--disk-afr", type=FRACTION, default="1%", show_default=True, help="annual failure rate of a disk")
@click.option("--node-afr", type=FRACTION, default="0.5%", show_default=True,
              help="annual rate of losing a whole node for good")
@click.option("--repair-mib-s", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="repair bandwidth per rebuilding node (the self-healing design's repair_mib_s)")
@click.option("--repair-parallelism", type=click.IntRange(min=1), default=1, show_default=True,
              help="nodes rebuilding one lost node's data at once (1: the worst case)")
@click.option("--repair-after", type=DURATION, default="10min", show_default=True,
              help="how long a node is down before its data is rebuilt (repair_after_s)")
@click.option("--independent-repairs", is_flag=True,
              help="rebuild each lost fragment independently (rate iμ) instead of one at a time (μ)")
@click.option("--stripe-size", type=SIZE, default="4MiB", show_default=True)
@click.option("--layout", "layouts", type=LAYOUT, multiple=True,
              help="a layout to compare, repeatable: 4+2, 8+3, rep3 [default: 4+2, 6+3, 8+3, rep3]")
@click.option("--from-bench", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a 'deepfs bench' results.json: per-node throughput and repair rate from it")
@click.option("--monte-carlo", type=click.IntRange(min=0), default=0, show_default=True,
              help="also simulate the chain with this many runs (only where loss is not too rare)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the Monte-Carlo simulation")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="write a PNG of durability (nines) against layout and node count")
def capacity_plan(**options: Any) -> None:
    """Plan storage nodes, capacity, bandwidth and durability for a model's checkpoints and data.

    Example: deepfs capacity-plan --model-size 175B --throughput 1000qps
    """
    bench = _read_bench(options["from_bench"]) if options["from_bench"] else None
    try:
        workload, hardware = _workload(options), _hardware(options)
        result = plan(workload, hardware, tuple(options["layouts"]) or DEFAULT_LAYOUTS, options["nodes"], bench,
                      options["monte_carlo"], options["seed"])
        if options["plot"]:
            write_plot(result, options["plot"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    except ModuleNotFoundError as exc:  # numpy and matplotlib come with deepfs's extras, not every install
        raise click.ClickException(f"capacity-plan needs {exc.name}: pip install {exc.name}") from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write the plot: {exc}") from exc
    if options["as_json"]:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        render(result)
        if options["plot"]:
            click.echo(f"plot: {options['plot']}")


def _workload(options: dict[str, Any]) -> Workload:
    return Workload(
        params=options["model_size"], precision=options["precision"], optimizer=options["optimizer"],
        master_weights=options["master_weights"], gradients=options["gradients"],
        checkpoint_interval_s=options["checkpoint_interval"], checkpoint_window_s=options["checkpoint_time"],
        checkpoints_kept=options["keep_checkpoints"], ranks=options["ranks"], throughput=options["throughput"],
        sample_bytes=options["sample_size"], dataset_bytes=options["dataset_size"],
        inference_replicas=options["inference_replicas"], inference_precision=options["inference_precision"],
        model_load_s=options["model_load_time"])


def _hardware(options: dict[str, Any]) -> Hardware:
    return Hardware(
        disks_per_node=options["disks_per_node"], disk_bytes=options["disk_size"],
        disk_bytes_per_s=options["disk_bw"], network_bytes_per_s=options["net_bw"], fill_target=options["fill"],
        disk_afr=options["disk_afr"], node_afr=options["node_afr"], repair_bytes_per_s=options["repair_mib_s"] * MiB,
        repair_parallelism=options["repair_parallelism"], repair_after_s=options["repair_after"],
        stripe_bytes=options["stripe_size"], parallel_repair=options["independent_repairs"])


def _read_bench(path: Path) -> BenchFigures:
    try:
        return figures_from_bench(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, BenchError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--from-bench") from exc


# ------------------------------------------------------------------ tables
def render(result: Plan) -> None:
    from rich.console import Console

    console = Console(width=max(Console().width, 120), highlight=False)
    console.print(_checkpoint_table(result))
    console.print(_demand_table(result))
    console.print(_layouts_table(result))
    for line in result.skipped:
        console.print(f"[yellow]skipped[/yellow] {line}")
    console.print(_footer(result))


def _checkpoint_table(result: Plan) -> Any:
    from rich.table import Table

    ckpt, work = result.demand.checkpoint, result.workload
    table = Table(title=f"Checkpoint of a {format_count(ckpt.params)}-parameter model "
                        f"({work.precision}, {work.optimizer})", title_justify="left")
    table.add_column("part")
    table.add_column("bytes/param", justify="right")
    table.add_column("size", justify="right")
    for part in ckpt.parts:
        table.add_row(part.name, f"{part.bytes_per_param:g}", format_bytes(part.size_bytes))
    table.add_row("[bold]checkpoint[/bold]", f"[bold]{ckpt.bytes_per_param:g}[/bold]",
                  f"[bold]{format_bytes(ckpt.size_bytes)}[/bold]")
    return table


def _demand_table(result: Plan) -> Any:
    from rich.table import Table

    need, work = result.demand, result.workload
    table = Table(title="What the workload asks of storage (client side, before redundancy)", title_justify="left")
    table.add_column("need")
    table.add_column("amount", justify="right")
    table.add_column("from")
    table.add_row("checkpoint write", format_rate(need.checkpoint_write_bytes_per_s),
                  f"{format_bytes(need.checkpoint.size_bytes)} in {format_duration(work.checkpoint_window_s)}")
    table.add_row("checkpoint write, averaged", format_rate(need.checkpoint_average_bytes_per_s),
                  f"one every {format_duration(work.checkpoint_interval_s)}")
    if need.checkpoint_per_rank_bytes is not None and work.ranks:
        table.add_row("checkpoint shard per rank", format_bytes(need.checkpoint_per_rank_bytes),
                      f"{work.ranks} ranks, {format_rate(need.checkpoint_write_bytes_per_s / work.ranks)} each")
    if work.throughput is None:
        data_from = "no --throughput given"
    elif need.data_read_from_requests:
        data_from = f"{work.throughput.requests_per_s:g} req/s × {format_bytes(work.sample_bytes)} (--sample-size)"
    else:
        data_from = "as given"
    table.add_row("data loading read", format_rate(need.data_read_bytes_per_s), data_from)
    load_from = (f"{work.inference_replicas} replicas × {format_bytes(need.inference_weights_bytes)} in "
                 f"{format_duration(work.model_load_s)}" if work.inference_replicas else "no inference replicas")
    table.add_row("model loading read", format_rate(need.model_load_bytes_per_s), load_from)
    table.add_row("[bold]peak write / read[/bold]", f"[bold]{format_rate(need.write_bytes_per_s)} / "
                  f"{format_rate(need.read_bytes_per_s)}[/bold]", "all three at once")
    table.add_row("[bold]data stored[/bold]", f"[bold]{format_bytes(need.stored_bytes)}[/bold]",
                  ", ".join(f"{what} {format_bytes(size)}" for what, size in need.stored_parts.items()))
    return table


def _layouts_table(result: Plan) -> Any:
    from rich.table import Table

    hw = result.hardware
    table = Table(title=f"Per layout: storage nodes of {hw.disks_per_node} × {format_bytes(hw.disk_bytes)}, "
                        f"{format_rate(result.node_write_bytes_per_s)} write / "
                        f"{format_rate(result.node_read_bytes_per_s)} read each", title_justify="left")
    table.add_column("", no_wrap=True)
    for lp in result.layouts:
        table.add_column(lp.redundancy.name, justify="right")
    for label, cell in _LAYOUT_ROWS:
        table.add_row(label, *(cell(lp) for lp in result.layouts))
    if any(lp.durability.monte_carlo or lp.durability.monte_carlo_note for lp in result.layouts):
        table.add_row("MTTDL, group, Monte-Carlo", *(_monte_carlo_cell(lp) for lp in result.layouts))
    return table


def _years(hours: float) -> str:
    return "∞" if not math.isfinite(hours) else f"{hours / HOURS_PER_YEAR:.3g} y"


def _nodes_cell(lp: LayoutPlan) -> str:
    text = f"[bold]{lp.nodes}[/bold]"
    return text + (" [red](short)[/red]" if lp.shortfalls else "")


def _monte_carlo_cell(lp: LayoutPlan) -> str:
    estimate = lp.durability.monte_carlo
    if estimate is None:
        return "too rare to simulate" if lp.durability.monte_carlo_note else "—"
    return f"{_years(estimate.mean_h)} ± {_years(estimate.half_width_h)}"


_LAYOUT_ROWS: tuple[tuple[str, Callable[[LayoutPlan], str]], ...] = (
    ("raw bytes per usable byte", lambda lp: f"{lp.redundancy.overhead:.3g}×"),
    ("storage nodes", _nodes_cell),
    ("  for capacity / bandwidth / k+m+1",
     lambda lp: f"{lp.nodes_for_capacity} / {lp.nodes_for_bandwidth} / {lp.nodes_minimum}"),
    ("  limited by", lambda lp: lp.limited_by if not lp.shortfalls else "; ".join(lp.shortfalls)),
    ("disks", lambda lp: str(lp.disks)),
    ("raw capacity", lambda lp: format_bytes(lp.raw_bytes)),
    ("usable capacity (raw × k/(k+m))", lambda lp: format_bytes(lp.usable_bytes)),
    ("usable at the fill target", lambda lp: format_bytes(lp.usable_at_fill_bytes)),
    ("stored with parity", lambda lp: format_bytes(lp.stored_raw_bytes)),
    ("writes at the disks", lambda lp: format_rate(lp.disk_write_bytes_per_s)),
    ("node bandwidth in use", lambda lp: f"{lp.bandwidth_utilisation:.0%}"),
    ("repair after a node / disk loss",
     lambda lp: f"{format_duration(lp.durability.node_repair_s)} / {format_duration(lp.durability.disk_repair_s)}"),
    ("MTTDL, one stripe group (exact)", lambda lp: _years(lp.durability.group_mttdl_h)),
    ("MTTDL, one group (closed form)", lambda lp: _years(lp.durability.group_mttdl_closed_form_h)),
    ("independent stripe groups", lambda lp: f"{lp.durability.effective_groups:.4g}"),
    ("MTTDL, cluster", lambda lp: _years(lp.durability.cluster_mttdl_h)),
    ("P(data loss) per year", lambda lp: f"{lp.durability.loss_probability_per_year:.2e}"),
    ("[bold]durability, nines per year[/bold]", lambda lp: f"[bold]{lp.durability.nines:.1f}[/bold]"),
)


def _footer(result: Plan) -> str:
    from rich.markup import escape

    hw = result.hardware
    lines = ["", "[bold]Where the figures come from[/bold]", *(f"  {escape(s)}" for s in result.sources),
             f"  failures: disk AFR {hw.disk_afr:.2%}, node AFR {hw.node_afr:.2%}; repair "
             f"{result.repair_bytes_per_s / MiB:.0f} MiB/s × {hw.repair_parallelism} node(s) after "
             f"{format_duration(hw.repair_after_s)} down; "
             f"{'independent repairs (iμ)' if hw.parallel_repair else 'one repair at a time per group (μ)'}",
             "  checkpoint accounting: ZeRO's (weights, gradients, fp32 master copy, fp32 optimizer state); "
             "--no-gradients for what frameworks write",
             "", "[bold]Where the durability model stops holding[/bold]"]
    lines += [f"  - {text}" for text in result.assumptions]
    lines.append("  Treat the nines as an upper bound and a way to compare layouts, not as a promise. "
                 "See docs/CAPACITY.md.")
    return "\n".join(lines)


# -------------------------------------------------------------------- plot
def write_plot(result: Plan, path: Path) -> None:
    """Left: nines per layout at the plan's node counts. Right: nines against node count, the plan's dots marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.8), width_ratios=(1, 1.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top = max([24, *(2 * lp.nodes for lp in result.layouts)])
    for i, lp in enumerate(result.layouts):
        color = colors[i % len(colors)]
        planned = lp.durability.nines if math.isfinite(lp.durability.nines) else 0.0
        bars.bar(i, planned, color=color)
        bars.annotate(f"{planned:.1f}", (i, planned), ha="center", va="bottom")
        counts = sorted({round(x) for x in _spread(lp.redundancy.width, top, 40)})
        curve = durability_curve(lp.redundancy, counts, result.demand.stored_bytes, result.hardware,
                                 result.repair_bytes_per_s)
        curves.plot(counts, [v if math.isfinite(v) else math.nan for v in curve], color=color,
                    label=lp.redundancy.name)
        curves.plot([lp.nodes], [planned], marker="o", color=color)
    bars.set_xticks(range(len(result.layouts)), [f"{lp.redundancy.name}\n{lp.nodes} nodes" for lp in result.layouts])
    bars.set_ylabel("durability per year (nines = -log10 P(loss))")
    bars.set_title("per layout, as planned")
    curves.set_xlabel("storage nodes")
    curves.set_title("against node count (dots: the plan)")
    curves.grid(True, alpha=0.3)
    curves.legend()
    fig.suptitle(f"{format_bytes(result.demand.stored_bytes)} stored, "
                 f"repair {result.repair_bytes_per_s / MiB:.0f} MiB/s per node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(low: int, high: int, points: int) -> list[float]:
    """About ``points`` node counts from ``low`` to ``high``, denser at the low end where the curves bend."""
    if high <= low:
        return [float(low)]
    ratio = (high / low) ** (1 / (points - 1))
    return [low * ratio**i for i in range(points)]

