"""How long a stripe group keeps its data: a Markov chain of fragment failures and repairs.

Mental model: one stripe group is n = k+m fragments on n distinct failure
domains. Each live fragment fails on its own at rate λ (its disk or its node
dies); a lost fragment is rebuilt at rate μ. The group's state is the number
of fragments lost, 0..m; one more failure in state m loses data (state m+1,
absorbing). The mean time to data loss (MTTDL) is the mean time from state 0
to m+1.

Three ways to get it, which the tests hold against each other:
- ``mttdl_exact_h``: the chain solved exactly on its generator matrix. Not by
  ``numpy.linalg.solve(Q_T, -1)``: where λ ≪ μ that system's condition number
  grows like (μ/λ)^m and an 8+3 layout loses every digit. Instead the loss
  transitions are sent back to state 0 (a renewal chain: every cycle starts
  afresh), its stationary distribution π is computed with the GTH variant of
  Gaussian elimination (Grassmann, Taksar, Heyman 1985: it only adds and
  multiplies positive numbers, so each π_i has full relative accuracy), and
  MTTDL = 1 / Σ_i π_i a_i, a_i the rate from state i into data loss.
- ``mttdl_closed_form_h``: the textbook approximation for λ ≪ μ,
  MTTDL ≈ (μ_1 μ_2 … μ_m) / (λ_0 λ_1 … λ_m) with λ_i = (n−i)λ. With serial
  repair (μ_i = μ, the default) that is μ^m / (n(n−1)…(n−m) λ^(m+1)); with
  independent repairs (μ_i = iμ) an extra factor m!.
- ``simulate_mttdl_h``: a Monte-Carlo simulation of the same chain
  (Gillespie, all runs advanced together as numpy vectors), with a 95%
  confidence interval. Only feasible where data loss is not rare: the cost
  grows like (μ/λ)^m, which ``expected_transitions`` predicts beforehand.

Rates are per hour, times in hours. numpy is imported where it is used:
it comes with deepfs's torch and bench extras, not with every install, and
the ``deepfs`` command must start without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "HOURS_PER_YEAR",
    "MonteCarloEstimate",
    "StripeChain",
    "annual_rate_from_afr",
    "effective_groups",
    "expected_transitions",
    "loss_probability",
    "mttdl_closed_form_h",
    "mttdl_exact_h",
    "nines",
    "simulate_mttdl_h",
]

HOURS_PER_YEAR = 8766.0  # 365.25 days


def annual_rate_from_afr(afr: float) -> float:
    """Failures per hour of one unit whose annual failure probability is ``afr`` (exponential lifetime)."""
    if not 0.0 <= afr < 1.0:
        raise ValueError(f"an annual failure rate must be in [0, 1), got {afr}")
    return -math.log1p(-afr) / HOURS_PER_YEAR


@dataclass(frozen=True, slots=True)
class StripeChain:
    """The birth–death chain of one stripe group of ``width`` = k+m fragments tolerating ``m`` losses.

    ``parallel_repair`` False (the default): one repair at a time per group,
    rate μ in every degraded state — DeepFS's repair is bandwidth-bound, and a
    second loss shares the same repair budget. True: each lost fragment is
    rebuilt independently, rate iμ in state i.
    """

    width: int
    m: int
    failure_rate_per_h: float
    repair_rate_per_h: float
    parallel_repair: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.m < self.width:
            raise ValueError(f"need 0 <= m < width, got m={self.m}, width={self.width}")
        if self.failure_rate_per_h <= 0 or self.repair_rate_per_h < 0:
            raise ValueError("the failure rate must be positive and the repair rate not negative")

    @property
    def states(self) -> int:
        """Transient states 0..m; state m+1 (data lost) is not counted."""
        return self.m + 1

    def failure_rate_in(self, lost: int) -> float:
        return (self.width - lost) * self.failure_rate_per_h

    def repair_rate_in(self, lost: int) -> float:
        if lost == 0:
            return 0.0
        return self.repair_rate_per_h * (lost if self.parallel_repair else 1)

    def generator(self) -> np.ndarray:
        """The (m+2)×(m+2) generator Q, state m+1 absorbing; rows sum to zero."""
        import numpy as np

        size = self.m + 2
        q = np.zeros((size, size))
        for lost in range(self.m + 1):
            q[lost, lost + 1] = self.failure_rate_in(lost)
            if lost:
                q[lost, lost - 1] = self.repair_rate_in(lost)
            q[lost, lost] = -q[lost].sum()
        return q


def _gth_stationary(rates: np.ndarray) -> np.ndarray:
    """Stationary distribution of an irreducible chain given its off-diagonal rates (diagonal ignored).

    GTH state reduction: eliminate the last state, fold its flows into the
    others, repeat; then rebuild π forwards. No subtraction anywhere.
    """
    import numpy as np

    a = np.array(rates, dtype=float)
    np.fill_diagonal(a, 0.0)
    size = a.shape[0]
    for last in range(size - 1, 0, -1):
        out = a[last, :last].sum()
        if out <= 0:
            raise ValueError("the chain is not irreducible")
        a[:last, last] /= out
        a[:last, :last] += np.outer(a[:last, last], a[last, :last])
        np.fill_diagonal(a, 0.0)
    pi = np.zeros(size)
    pi[0] = 1.0
    for state in range(1, size):
        pi[state] = pi[:state] @ a[:state, state]
    normalised: np.ndarray = pi / pi.sum()
    return normalised


def _renewal_rates(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Transient rates with every loss transition sent back to state 0, and the loss rate out of each state."""
    import numpy as np

    transient = q.shape[0] - 1
    loss = q[:transient, transient].copy()
    rates = q[:transient, :transient].copy()
    np.fill_diagonal(rates, 0.0)
    rates[:, 0] += loss
    return rates, loss


def mttdl_exact_h(chain: StripeChain) -> float:
    """Mean time from all fragments healthy to data loss, solved exactly on the generator."""
    rates, loss = _renewal_rates(chain.generator())
    pi = _gth_stationary(rates)
    return float(1.0 / (pi @ loss))


def expected_transitions(chain: StripeChain) -> float:
    """Mean number of failures plus repairs before data loss: what one Monte-Carlo run costs.

    The same renewal trick as ``mttdl_exact_h``, on the embedded jump chain
    (each row of Q divided by its total rate): every jump then takes unit time.
    """
    q = chain.generator()
    jumps = q.copy()
    for state in range(chain.states):
        jumps[state] /= -q[state, state]
    rates, loss = _renewal_rates(jumps)
    pi = _gth_stationary(rates)
    return float(1.0 / (pi @ loss))


def mttdl_closed_form_h(chain: StripeChain) -> float:
    """(μ_1 … μ_m) / (λ_0 … λ_m), the λ ≪ μ approximation; serial repair: μ^m / (n(n−1)…(n−m) λ^(m+1))."""
    log_mttdl = sum(math.log(chain.repair_rate_in(i)) for i in range(1, chain.m + 1))
    log_mttdl -= sum(math.log(chain.failure_rate_in(i)) for i in range(chain.m + 1))
    return math.exp(log_mttdl) if log_mttdl < 709 else math.inf


@dataclass(frozen=True, slots=True)
class MonteCarloEstimate:
    """The mean of ``runs`` simulated times to data loss and its 95% confidence half-width."""

    mean_h: float
    half_width_h: float
    runs: int

    @property
    def low_h(self) -> float:
        return self.mean_h - self.half_width_h

    @property
    def high_h(self) -> float:
        return self.mean_h + self.half_width_h

    def contains(self, value_h: float) -> bool:
        return self.low_h <= value_h <= self.high_h


def simulate_mttdl_h(chain: StripeChain, runs: int, seed: int, max_transitions: float = 5e7) -> MonteCarloEstimate:
    """Simulate ``runs`` independent groups from state 0 until each loses data.

    Raises ValueError when the expected work (runs × ``expected_transitions``)
    exceeds ``max_transitions``: realistic rates make loss far too rare to
    simulate directly, which is why the exact solution exists.
    """
    import numpy as np

    if runs < 2:
        raise ValueError("a confidence interval needs at least 2 runs")
    cost = runs * expected_transitions(chain)
    if cost > max_transitions:
        raise ValueError(f"about {cost:.2g} simulated transitions needed (limit {max_transitions:.2g}): "
                         "data loss is too rare at these rates to simulate directly")
    rng = np.random.default_rng(seed)
    lost_states = np.arange(chain.states + 1)
    up = np.array([chain.failure_rate_in(s) for s in lost_states[:-1]] + [0.0])
    down = np.array([chain.repair_rate_in(s) for s in lost_states[:-1]] + [0.0])
    state = np.zeros(runs, dtype=np.int64)
    elapsed = np.zeros(runs)
    active = np.arange(runs)
    while active.size:
        s = state[active]
        total = up[s] + down[s]
        elapsed[active] += rng.exponential(1.0 / total)
        fails = rng.random(active.size) * total < up[s]
        state[active] = s + np.where(fails, 1, -1)
        active = active[state[active] <= chain.m]
    mean = float(elapsed.mean())
    half_width = 1.96 * float(elapsed.std(ddof=1)) / math.sqrt(runs)
    return MonteCarloEstimate(mean, half_width, runs)


def effective_groups(nodes: int, width: int, m: int, stripes: float) -> float:
    """How many independent stripe groups a cluster behaves like, for data loss.

    Data is lost when m+1 failure domains that share a stripe are down at
    once. Stripes are placed pseudo-randomly (rendezvous hashing), so with S
    stripes the number of distinct (m+1)-sets of nodes that share some stripe
    is U = C(N, m+1)·(1 − (1 − p)^S), p = C(n, m+1)/C(N, m+1) the chance that
    one stripe covers a given set. One group covers C(n, m+1) such sets, so
    the cluster fails like U / C(n, m+1) groups: 1 when N = n, and C(N, 3)
    for 3-way replication spread over many nodes (the copysets result).
    """
    if nodes < width:
        raise ValueError(f"{width} fragments need at least {width} nodes, got {nodes}")
    if stripes <= 0:
        return 0.0
    sets_in_cluster = math.comb(nodes, m + 1)
    sets_in_group = math.comb(width, m + 1)
    p = sets_in_group / sets_in_cluster
    covered = 1.0 if p >= 1.0 else -math.expm1(stripes * math.log1p(-p))
    return sets_in_cluster * covered / sets_in_group


def loss_probability(mttdl_h: float, horizon_h: float = HOURS_PER_YEAR) -> float:
    """Probability of at least one loss within ``horizon_h``, losses arriving at rate 1/MTTDL."""
    if mttdl_h == math.inf:
        return 0.0
    return -math.expm1(-horizon_h / mttdl_h)


def nines(probability: float) -> float:
    """-log10(p): 6 nines is 99.9999% durability. Infinite for p = 0."""
    return math.inf if probability <= 0 else -math.log10(probability)
