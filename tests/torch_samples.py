"""Sample checkpoints and a strict comparison, shared by the torch adapter tests."""

from __future__ import annotations

import torch


def assert_same(expected: object, got: object, where: str = "") -> None:
    """Equal structure, and every tensor equal byte for byte with the same dtype, shape and strides."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert (got.dtype, got.shape, got.stride(), got.storage_offset()) == (
            expected.dtype, expected.shape, expected.stride(), expected.storage_offset()), where
        assert torch.equal(storage_bytes(got), storage_bytes(expected)), where
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and list(got) == list(expected), where
        for key in expected:
            assert_same(expected[key], got[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(expected, got, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == expected, where


def storage_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The whole storage under ``tensor`` as uint8 (so views, padding and bit patterns all count)."""
    return torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage())


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    floats = torch.randn(37, 11, generator=g)
    return {
        "float32": floats,
        "float64": floats.double(),
        "float16": floats.half(),
        "bfloat16": floats.bfloat16(),
        "complex64": torch.randn(13, dtype=torch.complex64, generator=g),
        "int8": torch.randint(-128, 128, (101,), dtype=torch.int8, generator=g),
        "int16": torch.randint(-(2**15), 2**15, (55,), dtype=torch.int16, generator=g),
        "int32": torch.randint(-(2**31), 2**31 - 1, (77,), dtype=torch.int32, generator=g),
        "int64": torch.randint(-(2**62), 2**62, (33,), dtype=torch.int64, generator=g),
        "uint8": torch.randint(0, 256, (99,), dtype=torch.uint8, generator=g),
        "bool": torch.rand(45, generator=g) > 0.5,
    }


def shared_views() -> dict[str, object]:
    base = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    return {
        "base": base,
        "transposed": base.t(),  # non-contiguous
        "rows": base[10:20],
        "strided": base[::3, 1::2],
        "flat": base.view(-1)[100:200],
        "same_again": base,
    }


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.LayerNorm(256), torch.nn.GELU(),
            torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.GELU(),
            torch.nn.Linear(256, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def trained(seed: int) -> tuple[SmallNet, torch.optim.Adam]:
    torch.manual_seed(seed)
    model = SmallNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = model(torch.randn(16, 64)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer
