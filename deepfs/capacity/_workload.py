"""What an AI workload asks of storage: checkpoint sizes and the bandwidths of its three traffic kinds.

Checkpoint accounting (the one in the ZeRO paper, Rajbhandari et al. 2020):
a model trained in mixed precision keeps, per parameter,
- the weights in the training precision (bf16/fp16: 2 bytes),
- their gradients in the same precision (2 bytes),
- an fp32 master copy of the weights (4 bytes; only below fp32),
- the optimizer's state in fp32: Adam/AdamW its first and second moments
  m and v (4 + 4 bytes), momentum SGD and Lion one buffer (4 bytes), plain
  SGD nothing, 8-bit Adam two 1-byte moments.
With bf16 and Adam that is 2 + 2 + 4 + 8 = 16 bytes per parameter: 2.8 TB
for 175B parameters. Frameworks usually do not write gradients (they are
recomputed after a restart), which gives 14 bytes/param; ``gradients=False``
plans for that. Everything else stored (the dataset, an inference export of
the weights) is counted separately.

Traffic kinds, sized separately and added for the peak (training reads its
data while a checkpoint is written, and replicas may load at the same time):
- checkpoint writes: a checkpoint must land within its window;
- data loading: requests per second times the sample size, or a bandwidth;
- model loading: every inference replica reads the weights within a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deepfs.capacity._units import Rate

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "CheckpointPart",
    "CheckpointSize",
    "Demand",
    "Workload",
    "checkpoint_size",
    "demand",
]

PRECISIONS: dict[str, float] = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0}
"""Bytes per value."""

OPTIMIZERS: dict[str, tuple[tuple[str, float], ...]] = {
    "adam": (("optimizer: Adam first moment m (fp32)", 4.0), ("optimizer: Adam second moment v (fp32)", 4.0)),
    "adamw": (("optimizer: AdamW first moment m (fp32)", 4.0), ("optimizer: AdamW second moment v (fp32)", 4.0)),
    "adam8bit": (("optimizer: 8-bit Adam m (int8)", 1.0), ("optimizer: 8-bit Adam v (int8)", 1.0)),
    "lion": (("optimizer: Lion momentum (fp32)", 4.0),),
    "momentum": (("optimizer: SGD momentum buffer (fp32)", 4.0),),
    "sgd": (),
}
"""The optimizer's per-parameter state: (what, bytes per parameter)."""


@dataclass(frozen=True, slots=True)
class CheckpointPart:
    name: str
    bytes_per_param: float
    size_bytes: float


@dataclass(frozen=True, slots=True)
class CheckpointSize:
    params: float
    parts: tuple[CheckpointPart, ...]

    @property
    def bytes_per_param(self) -> float:
        return sum(p.bytes_per_param for p in self.parts)

    @property
    def size_bytes(self) -> float:
        return sum(p.size_bytes for p in self.parts)


def checkpoint_size(params: float, precision: str = "bf16", optimizer: str = "adam",
                    master_weights: bool | None = None, gradients: bool = True) -> CheckpointSize:
    """The parts of one full training checkpoint; ``master_weights`` None: an fp32 copy iff below fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    width = PRECISIONS[precision]
    if master_weights is None:
        master_weights = width < 4.0
    per_param = [(f"weights ({precision})", width)]
    if gradients:
        per_param.append((f"gradients ({precision})", width))
    if master_weights:
        per_param.append(("fp32 master weights", 4.0))
    per_param.extend(OPTIMIZERS[optimizer])
    return CheckpointSize(params, tuple(CheckpointPart(name, b, b * params) for name, b in per_param))


@dataclass(frozen=True, slots=True)
class Workload:
    """The operator's description of the job, in base units (parameters, bytes, seconds)."""

    params: float
    precision: str = "bf16"
    optimizer: str = "adam"
    master_weights: bool | None = None
    gradients: bool = True
    checkpoint_interval_s: float = 1800.0
    checkpoint_window_s: float = 300.0  # the time a checkpoint may take
    checkpoints_kept: int = 3
    ranks: int | None = None
    throughput: Rate | None = None
    sample_bytes: float = float(1 << 20)
    dataset_bytes: float = 0.0
    inference_replicas: int = 0
    inference_precision: str | None = None  # None: the training precision
    model_load_s: float = 60.0

    def __post_init__(self) -> None:
        positive = {"checkpoint interval": self.checkpoint_interval_s, "checkpoint window": self.checkpoint_window_s,
                    "model load time": self.model_load_s, "sample size": self.sample_bytes}
        for what, value in positive.items():
            if value <= 0:
                raise ValueError(f"the {what} must be positive")
        if self.checkpoint_window_s > self.checkpoint_interval_s:
            raise ValueError("a checkpoint cannot take longer than the interval between checkpoints")
        if self.checkpoints_kept < 1 or self.inference_replicas < 0 or (self.ranks is not None and self.ranks < 1):
            raise ValueError("checkpoints kept and ranks must be at least 1, inference replicas not negative")
        if self.inference_precision is not None and self.inference_precision not in PRECISIONS:
            raise ValueError(f"unknown inference precision {self.inference_precision!r}")


@dataclass(frozen=True, slots=True)
class Demand:
    """What the workload needs from the file system, as the clients see it (before any redundancy)."""

    checkpoint: CheckpointSize
    checkpoint_write_bytes_per_s: float
    checkpoint_average_bytes_per_s: float
    checkpoint_per_rank_bytes: float | None
    data_read_bytes_per_s: float
    data_read_from_requests: bool
    inference_weights_bytes: float
    model_load_bytes_per_s: float
    stored_bytes: float
    stored_parts: dict[str, float] = field(default_factory=dict)

    @property
    def write_bytes_per_s(self) -> float:
        return self.checkpoint_write_bytes_per_s

    @property
    def read_bytes_per_s(self) -> float:
        return self.data_read_bytes_per_s + self.model_load_bytes_per_s


def demand(workload: Workload) -> Demand:
    ckpt = checkpoint_size(workload.params, workload.precision, workload.optimizer,
                           workload.master_weights, workload.gradients)
    data_read = workload.throughput.to_bytes_per_s(workload.sample_bytes) if workload.throughput else 0.0
    inference_precision = workload.inference_precision or workload.precision
    weights = workload.params * PRECISIONS[inference_precision] if workload.inference_replicas else 0.0
    stored = {
        f"checkpoints ({workload.checkpoints_kept} kept)": workload.checkpoints_kept * ckpt.size_bytes,
        "dataset": workload.dataset_bytes,
        f"inference weights ({inference_precision})": weights,
    }
    stored = {what: size for what, size in stored.items() if size > 0}
    return Demand(
        checkpoint=ckpt,
        checkpoint_write_bytes_per_s=ckpt.size_bytes / workload.checkpoint_window_s,
        checkpoint_average_bytes_per_s=ckpt.size_bytes / workload.checkpoint_interval_s,
        checkpoint_per_rank_bytes=ckpt.size_bytes / workload.ranks if workload.ranks else None,
        data_read_bytes_per_s=data_read,
        data_read_from_requests=bool(workload.throughput and workload.throughput.requests_per_s is not None),
        inference_weights_bytes=weights,
        model_load_bytes_per_s=workload.inference_replicas * weights / workload.model_load_s,
        stored_bytes=sum(stored.values()),
        stored_parts=stored,
    )
