"""Two ways to pool patch tokens to the teacher grid, and two ways to take the fused target's argmax.

Evidence for ``docs/results/throughput.md``: the shipped ``align_to_grid`` (transpose, then
``avg_pool2d``) against a block mean in the (N, M, D) layout, each with the distillation head and
its backward; and the argmax of the hard CSKD target over a transposed view (shipped) against the
argmax over the contiguous (N, K, H, W) tensor. Fashion-MNIST sizes: 128 images, 8 x 8 -> 4 x 4,
width 64, 10 classes, one thread.

    python benchmarks/pooling_microbench.py
"""

from __future__ import annotations

import time

import torch

from cskd.method.align import align_to_grid

N, H, W, C, TH, TW, K = 128, 8, 8, 64, 4, 4, 10


def block_mean(values: torch.Tensor) -> torch.Tensor:
    """(N, h*w, C) -> (N, H*W, C) by a mean over blocks, without leaving the token layout."""
    blocks = values.reshape(N, TH, H // TH, TW, W // TW, C)
    return blocks.mean(dim=(2, 4)).reshape(N, TH * TW, C)


def shipped(values: torch.Tensor) -> torch.Tensor:
    return align_to_grid(values, (H, W), (TH, TW))


def milliseconds(function, repeats: int) -> float:
    for _ in range(max(repeats // 10, 1)):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - start) / repeats


def main() -> None:
    torch.set_num_threads(1)
    tokens = torch.randn(N, H * W, C, requires_grad=True)
    head = torch.nn.Linear(C, K)
    reference = shipped(tokens)
    torch.testing.assert_close(block_mean(tokens), reference)
    for _ in range(2):  # twice, to see the spread
        for name, pool in (
            ("transpose + avg_pool2d (shipped)", shipped),
            ("block mean", block_mean),
        ):
            time_ms = milliseconds(lambda pool=pool: head(pool(tokens)).sum().backward(), 300)
            print(f"pool + head, forward and backward, {name}: {time_ms:.3f} ms")
    target = torch.randn(N, K, TH, TW)
    assert torch.equal(
        target.flatten(2).transpose(1, 2).argmax(dim=-1).reshape(-1),
        target.argmax(dim=1).reshape(-1),
    )
    for name, function in (
        (
            "argmax over the transposed view (shipped)",
            lambda: target.flatten(2).transpose(1, 2).argmax(-1),
        ),
        ("argmax over the contiguous target", lambda: target.argmax(dim=1)),
    ):
        print(f"{name}: {milliseconds(function, 2000):.4f} ms")


if __name__ == "__main__":
    main()
