"""Time mmeff's token primitives: the dispatched path against the plain PyTorch reference.

    python -m mmeff.bench.kernels            # LLaVA sizes (B in 1/8/32, N in 576/2304, D 1024) + ViT-B (N 197, D 768)
    python -m mmeff.bench.kernels --quick    # B in 1/8 only, for a CPU

Reports the median time of a call (``triton.testing.do_bench`` on CUDA, with the L2 cache flushed between
runs; ``torch.utils.benchmark.Timer`` on a CPU), the ratio to the reference, and achieved GB/s (bytes read + written by the ideal kernel / time), with the fraction of the
device's memory bandwidth when it is known. On a CPU the dispatched path *is* the reference, so only the
reference is timed; on CUDA both are.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from mmeff.kernels import dct
from mmeff.kernels import gather as g
from mmeff.kernels import merge as m
from mmeff.kernels.dispatch import forced_backend

# peak DRAM bandwidth in GB/s by device-name fragment (vendor datasheets)
_BANDWIDTH = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def _bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _BANDWIDTH.items() if k in name), None)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> float:
    """Median seconds of one ``fn()`` call.

    CUDA: ``triton.testing.do_bench`` (the L2 cache flushed before every run, launch overhead and warm-up
    handled by Triton; ``warmup`` / ``repeats`` are ignored there). Elsewhere, and on CUDA without Triton:
    ``torch.utils.benchmark.Timer`` with its adaptive autorange (it synchronises CUDA, picks the number of
    runs per measurement until the median is stable) after ``warmup`` calls; ``repeats`` bounds the
    measurements it may take.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, return_mode="median")) / 1e3  # milliseconds -> seconds
    from torch.utils.benchmark import Timer

    for _ in range(warmup):
        fn()
    measurement = Timer(stmt="fn()", globals={"fn": fn}).adaptive_autorange(max_run_time=max(1.0, 0.5 * repeats))
    return float(measurement.median)


def cases(quick: bool) -> list[tuple[int, int, int]]:
    """(B, N, D) sizes to time."""
    bs = (1, 8) if quick else (1, 8, 32)
    return [(b, n, 1024) for b in bs for n in (576, 2304)] + [(b, 197, 768) for b in bs]


def bench_prune(b: int, n: int, d: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """Keep a quarter of the tokens by score: top-k + gather."""
    x = torch.randn(b, n, d, device=device, dtype=dtype)
    s = torch.randn(b, n, device=device)
    k = n // 4
    moved = (b * k * d * 2 + b * n) * x.element_size()  # read kept rows + scores, write kept rows
    return _rows("prune", b, n, d, lambda: g.prune(x, s, k), moved, device)


def _paths(device: torch.device) -> list[str]:
    return ["torch"] + (["triton"] if device.type == "cuda" else [])


def _rows(op: str, b: int, n: int, d: int, fn: Callable[[], object], moved: int, device: torch.device) -> list[tuple]:
    rows, ref_t = [], None
    for p in _paths(device):
        with forced_backend(p):
            t = timeit(fn, device)
        ref_t = t if p == "torch" else ref_t
        rows.append((op, b, n, d, p, t, ref_t / t, moved / t / 1e9))
    return rows


def bench_merge(b: int, n: int, d: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """One ToMe step merging r = N // 4 tokens (matching + size-weighted merge)."""
    x = torch.randn(b, n, d, device=device, dtype=dtype)
    r = n // 4

    def step() -> object:
        merge, _ = m.bipartite_soft_matching(x, r, class_token=True)
        return m.merge_wavg(merge, x)

    moved = (b * n * d + b * (n - r) * d) * x.element_size()
    rows = _rows("merge", b, n, d, step, moved, device)
    tome = _published_tome()
    if tome is not None:

        def tome_step() -> object:
            merge, _ = tome.bipartite_soft_matching(x, r, class_token=True)
            return tome.merge_wavg(merge, x)

        t = timeit(tome_step, device)
        ref_t = rows[0][5]
        rows.append(("merge", b, n, d, "ToMe", t, ref_t / t, moved / t / 1e9))
    return rows


def _published_tome():
    """facebookresearch/ToMe's ``tome.merge`` when it is installed (it is not on PyPI), else None."""
    try:
        from tome import merge as tome_merge
    except ImportError:
        return None
    return tome_merge if hasattr(tome_merge, "bipartite_soft_matching") else None


def bench_dct(b: int, n: int, d: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """Fourier-VLM low-pass of a square grid to a quarter of the tokens."""
    side = int(n**0.5)
    if side * side != n:
        return []
    x = torch.randn(b, side, side, d, device=device, dtype=dtype)
    moved = (b * n * d + b * (n // 4) * d) * x.element_size()
    return _rows("dct", b, n, d, lambda: dct.dct_lowpass(x, (side // 2, side // 2)), moved, device)


def main(argv: list[str] | None = None) -> None:
    """Command line: print the table."""
    ap = argparse.ArgumentParser(prog="python -m mmeff.bench.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    bw = _bandwidth(device)
    if _published_tome() is None:
        print("published ToMe (facebookresearch/ToMe) is not importable: its merge path is not timed")
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"dtype {args.dtype}, peak bandwidth {bw or 'unknown'} GB/s")
    print(f"{'op':<8}{'B':>4}{'N':>6}{'D':>6}  {'path':<7}{'median ms':>10}{'x ref':>7}{'GB/s':>9}{'% peak':>8}")
    for b, n, d in cases(args.quick):
        rows = bench_prune(b, n, d, device, dtype) + bench_merge(b, n, d, device, dtype) + bench_dct(b, n, d, device, dtype)
        for op, *rest in rows:
            bb, nn_, dd, path, t, ratio, gbs = rest
            peak = f"{100 * gbs / bw:.0f}" if bw else "-"
            print(f"{op:<8}{bb:>4}{nn_:>6}{dd:>6}  {path:<7}{t * 1e3:>10.3f}{ratio:>7.2f}{gbs:>9.1f}{peak:>8}")


if __name__ == "__main__":
    main()
