"""``deepfs capacity-plan`` and its model (``deepfs.capacity``): units, checkpoint sizes, the durability chain.

The durability chain is checked three ways: against exact rational
arithmetic (the GTH solution keeps full precision where a plain linear solve
loses every digit), against the closed-form MTTDL where λ ≪ μ, and against a
seeded Monte-Carlo simulation at high failure rates, where it is fast.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deepfs.capacity import (
    Hardware,
    Rate,
    Redundancy,
    StripeChain,
    UnitError,
    Workload,
    checkpoint_size,
    effective_groups,
    figures_from_bench,
    mttdl_closed_form_h,
    mttdl_exact_h,
    parse_bandwidth,
    parse_duration,
    parse_fraction,
    parse_model_size,
    parse_rate,
    parse_redundancy,
    parse_size,
    plan,
    simulate_mttdl_h,
)
from deepfs_cli.capacity_plan import capacity_plan

pytestmark = pytest.mark.unit


# ------------------------------------------------------------------- units
@pytest.mark.parametrize(("text", "params"), [
    ("175B", 175e9), ("70B", 70e9), ("1.5T", 1.5e12), ("7e9", 7e9), ("70b", 70e9), ("350M", 350e6), ("8 B", 8e9),
])
def test_model_sizes(text: str, params: float) -> None:
    assert parse_model_size(text) == pytest.approx(params)


@pytest.mark.parametrize(("text", "rate"), [
    ("1000qps", Rate(requests_per_s=1000.0)),
    ("5k rps", Rate(requests_per_s=5000.0)),
    ("2GB/s", Rate(bytes_per_s=2e9)),
    ("500MiB/s", Rate(bytes_per_s=500 * 2**20)),
    ("100Gbit/s", Rate(bytes_per_s=12.5e9)),
    ("100Gbps", Rate(bytes_per_s=12.5e9)),
])
def test_rates(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


def test_sizes_durations_fractions() -> None:
    assert parse_size("16TiB") == 16 * 2**40
    assert parse_size("15.36TB") == pytest.approx(15.36e12)
    assert parse_duration("30min") == 1800
    assert parse_duration("1h") == 3600
    assert parse_duration("2d") == 172800
    assert parse_fraction("1%") == pytest.approx(0.01)
    assert parse_fraction("0.8") == pytest.approx(0.8)
    assert parse_redundancy("8+3") == Redundancy(8, 3)
    assert parse_redundancy("rep3") == parse_redundancy("3x") == Redundancy(1, 2)


@pytest.mark.parametrize(("parser", "text"), [
    (parse_model_size, "175X"), (parse_model_size, "big"), (parse_model_size, "-5B"), (parse_model_size, ""),
    (parse_rate, "1000"), (parse_rate, "2GB/h"), (parse_rate, "fast"), (parse_bandwidth, "1000qps"),
    (parse_size, "16 parsecs"), (parse_duration, "3 fortnights"), (parse_fraction, "80"),
])
def test_garbage_is_refused_with_a_reason(parser, text: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnitError, match=r"\(|expected|fraction"):
        parser(text)


def test_bad_option_is_a_usage_error_naming_the_option() -> None:
    result = CliRunner().invoke(capacity_plan, ["--model-size", "175X"])
    assert result.exit_code == 2
    assert "--model-size" in result.output and "175X" in result.output
    result = CliRunner().invoke(capacity_plan, ["--model-size", "7B", "--throughput", "lots"])
    assert result.exit_code == 2 and "--throughput" in result.output


# -------------------------------------------------------------- checkpoint
def test_checkpoint_of_175b_with_adam_mixed_precision() -> None:
    ckpt = checkpoint_size(175e9, "bf16", "adam")
    assert ckpt.bytes_per_param == 16  # 2 weights + 2 gradients + 4 fp32 master + 4 m + 4 v
    assert ckpt.size_bytes == pytest.approx(2.8e12)
    assert [p.bytes_per_param for p in ckpt.parts] == [2, 2, 4, 4, 4]
    assert checkpoint_size(175e9, "bf16", "adam", gradients=False).bytes_per_param == 14
    assert checkpoint_size(7e9, "fp32", "sgd").bytes_per_param == 8  # weights + gradients, no master copy


# -------------------------------------------------------------- durability
def _mttdl_rational(chain: StripeChain) -> float:
    """The birth–death first-passage recursion in exact fractions: time from j lost to j+1 lost, summed."""
    lam, mu = Fraction(chain.failure_rate_per_h), Fraction(chain.repair_rate_per_h)
    total, step = Fraction(0), Fraction(0)
    for lost in range(chain.m + 1):
        repair = mu * (lost if chain.parallel_repair else 1) if lost else Fraction(0)
        step = (1 + repair * step) / ((chain.width - lost) * lam)
        total += step
    return float(total)


@pytest.mark.parametrize(("width", "m", "parallel"), [(6, 2, False), (11, 3, False), (3, 2, True), (24, 8, False)])
def test_exact_solution_keeps_full_precision_where_lambda_is_tiny(width: int, m: int, parallel: bool) -> None:
    chain = StripeChain(width, m, failure_rate_per_h=1e-7, repair_rate_per_h=0.2, parallel_repair=parallel)
    assert mttdl_exact_h(chain) == pytest.approx(_mttdl_rational(chain), rel=1e-9)


@pytest.mark.parametrize(("width", "m", "parallel"), [(6, 2, False), (11, 3, False), (9, 3, True), (3, 2, False)])
def test_markov_agrees_with_closed_form_where_lambda_much_less_than_mu(width: int, m: int, parallel: bool) -> None:
    # disks with a 1% AFR, repaired in 6 h: λ/μ ~ 7e-6
    chain = StripeChain(width, m, failure_rate_per_h=1.15e-6, repair_rate_per_h=1 / 6, parallel_repair=parallel)
    assert mttdl_closed_form_h(chain) == pytest.approx(mttdl_exact_h(chain), rel=0.02)


def test_closed_form_is_exactly_mu_to_the_m_over_the_falling_product() -> None:
    lam, mu = 1e-5, 0.1
    chain = StripeChain(6, 2, lam, mu)
    assert mttdl_closed_form_h(chain) == pytest.approx(mu**2 / (6 * 5 * 4 * lam**3))


def test_closed_form_does_not_apply_where_failures_outpace_repair() -> None:
    chain = StripeChain(6, 2, failure_rate_per_h=1.0, repair_rate_per_h=2.0)
    assert mttdl_closed_form_h(chain) < 0.5 * mttdl_exact_h(chain)


@pytest.mark.parametrize(("chain", "seed"), [
    (StripeChain(6, 2, failure_rate_per_h=1.0, repair_rate_per_h=4.0), 1),
    (StripeChain(6, 2, failure_rate_per_h=1.0, repair_rate_per_h=4.0, parallel_repair=True), 2),
    (StripeChain(3, 2, failure_rate_per_h=0.5, repair_rate_per_h=3.0), 3),
    (StripeChain(11, 3, failure_rate_per_h=1.0, repair_rate_per_h=6.0), 4),
])
def test_markov_agrees_with_monte_carlo_within_its_confidence_interval(chain: StripeChain, seed: int) -> None:
    exact = mttdl_exact_h(chain)
    estimate = simulate_mttdl_h(chain, runs=4000, seed=seed)
    assert estimate.half_width_h < 0.1 * estimate.mean_h  # the interval is tight enough to mean something
    assert estimate.contains(exact), (estimate, exact)


def test_monte_carlo_refuses_rates_it_cannot_finish() -> None:
    with pytest.raises(ValueError, match="too rare"):
        simulate_mttdl_h(StripeChain(6, 2, 1e-6, 0.1), runs=100, seed=0)


def test_effective_groups() -> None:
    assert effective_groups(6, 6, 2, stripes=1e6) == pytest.approx(1.0)
    assert effective_groups(12, 6, 2, stripes=1e9) == pytest.approx(math.comb(12, 3) / math.comb(6, 3))
    assert effective_groups(60, 3, 2, stripes=1e9) == pytest.approx(math.comb(60, 3))  # copysets
    assert effective_groups(60, 3, 2, stripes=10) == pytest.approx(10, rel=0.01)  # few stripes: few groups


# -------------------------------------------------------------------- plan
def test_plan_numbers_agree_with_each_other() -> None:
    workload = Workload(175e9, throughput=Rate(requests_per_s=1000.0), sample_bytes=1e6)
    hardware = Hardware()
    result = plan(workload, hardware, (Redundancy(4, 2), Redundancy(1, 2)))
    assert result.demand.checkpoint_write_bytes_per_s == pytest.approx(2.8e12 / 300)
    assert result.demand.read_bytes_per_s == pytest.approx(1e9)
    for lp in result.layouts:
        k, width = lp.redundancy.k, lp.redundancy.width
        assert lp.nodes == max(lp.nodes_for_capacity, lp.nodes_for_bandwidth, width + 1)
        assert lp.raw_bytes == pytest.approx(lp.nodes * hardware.disks_per_node * hardware.disk_bytes)
        assert lp.usable_bytes == pytest.approx(lp.raw_bytes * k / width)
        assert lp.stored_raw_bytes == pytest.approx(3 * 2.8e12 * width / k)
        assert lp.stored_raw_bytes <= lp.usable_at_fill_bytes * width / k
        assert lp.bandwidth_utilisation <= 1.0
        d = lp.durability
        assert 0 < d.loss_probability_per_year < 1e-6
        assert d.nines == pytest.approx(-math.log10(d.loss_probability_per_year))


def test_from_bench_without_a_repair_rate_uses_the_read_bandwidth() -> None:
    def result(job: str, median: float) -> dict[str, object]:
        return {"suite": "fio", "job": job, "target": "deepfs", "metrics": {"bw_mib_s": {"median": median}}}

    doc: dict[str, Any] = {"config": {"cluster": {"nodes": 6, "k": 4, "m": 2}},
           "results": [result("seqwrite_1m_j4", 400.0), result("seqread_1m_j4", 900.0)]}
    figures = figures_from_bench(doc)
    assert figures.write_bytes_per_s == pytest.approx(400 * 1.5 * 2**20)
    assert figures.repair_bytes_per_s == pytest.approx(900 * 2**20) and not figures.repair_measured
    assert any("no repair rate" in note for note in figures.notes)
    # The repair suite's foreground jobs (sequential I/O while repair runs) are not the repair rate.
    doc["results"].append({"suite": "repair", "job": "during_seqread", "target": "deepfs-client",
                           "metrics": {"bw_mib_s": {"median": 480.0}}})
    assert not figures_from_bench(doc).repair_measured
    doc["results"].append({"suite": "repair", "job": "during_repair", "target": "deepfs-client",
                           "metrics": {"repair_mib_s": {"median": 150.0}}})
    figures = figures_from_bench(doc)
    assert figures.repair_bytes_per_s == pytest.approx(150 * 2**20) and figures.repair_measured


# --------------------------------------------------------------------- CLI
def test_original_command_prints_a_sane_plan() -> None:
    result = CliRunner().invoke(capacity_plan, ["--model-size", "175B", "--throughput", "1000qps"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "2.8 TB" in out  # the checkpoint: 175B × 16 bytes
    assert "9.33 GB/s" in out  # written in the default 5 min window
    for layout in ("RS 4+2", "RS 8+3", "RS 6+3", "3x replication"):
        assert layout in out
    assert "nines" in out and "P(data loss) per year" in out
    assert "Where the durability model stops holding" in out and "independent" in out


def test_json_parses_and_matches_the_plan(tmp_path: Path) -> None:
    args = ["--model-size", "70B", "--throughput", "2GB/s", "--layout", "4+2", "--layout", "rep3", "--json"]
    result = CliRunner().invoke(capacity_plan, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["checkpoint"]["size_bytes"] == pytest.approx(70e9 * 16)
    assert doc["demand"]["data_read_bytes_per_s"] == pytest.approx(2e9)
    assert [lp["redundancy"]["name"] for lp in doc["layouts"]] == ["RS 4+2", "3x replication"]
    for lp in doc["layouts"]:
        assert lp["nodes"] >= lp["redundancy"]["k"] + lp["redundancy"]["m"] + 1
        assert 0 < lp["durability"]["loss_probability_per_year"] < 1
        assert lp["durability"]["group_mttdl_h"] == pytest.approx(lp["durability"]["group_mttdl_closed_form_h"],
                                                                  rel=0.02)
    assert doc["assumptions"]


def test_plot_writes_a_png(tmp_path: Path) -> None:
    png = tmp_path / "durability.png"
    result = CliRunner().invoke(capacity_plan, ["--model-size", "7B", "--layout", "4+2", "--layout", "8+3",
                                                "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fixed_node_count_reports_shortfalls_and_skips_layouts_that_do_not_fit() -> None:
    result = CliRunner().invoke(capacity_plan, ["--model-size", "175B", "--nodes", "8", "--net-bw", "1GB/s",
                                                "--layout", "4+2", "--layout", "8+3", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [lp["redundancy"]["name"] for lp in doc["layouts"]] == ["RS 4+2"]
    assert doc["layouts"][0]["shortfalls"] and "RS 8+3" in doc["skipped"][0]


def test_impossible_combinations_are_usage_errors() -> None:
    result = CliRunner().invoke(capacity_plan, ["--model-size", "7B", "--checkpoint-interval", "10min",
                                                "--checkpoint-time", "1h"])
    assert result.exit_code == 2 and "longer than the interval" in result.output
    result = CliRunner().invoke(capacity_plan, ["--model-size", "7B", "--disk-afr", "0", "--node-afr", "0"])
    assert result.exit_code == 2 and "failure rates must be positive" in result.output
