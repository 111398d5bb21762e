"""How fast is torch._grouped_mm on this GPU next to a dense matmul of the same FLOPs, per weight layout?
Forward and backward of one projection x [A, D] @ W_e for A = T*K rows spread evenly over E experts.
A measurement aid for the expert backend (see BENCHMARKS.md), not part of the package.
Usage: python benchmarks/grouped_mm_probe.py   (needs CUDA)"""

import torch


def bench(fn, reps=20, warmup=5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    for t, e, k, d, n in [(16384, 8, 2, 2048, 4096), (16384, 64, 8, 2048, 1024), (16384, 128, 8, 2048, 1024)]:
        shape(t, e, k, d, n)


def shape(t, e, k, d, n):
    dev, bf = "cuda", torch.bfloat16
    a = t * k
    x = torch.randn(a, d, device=dev, dtype=bf, requires_grad=True)
    g = torch.randn(a, n, device=dev, dtype=bf)
    dense_w = torch.randn(d, n * 1, device=dev, dtype=bf, requires_grad=True)
    w_nk = torch.randn(e, n, d, device=dev, dtype=bf, requires_grad=True)  # [E, out, in]: used transposed
    w_kn = torch.randn(e, d, n, device=dev, dtype=bf, requires_grad=True)  # [E, in, out]: used as is
    offs = torch.arange(1, e + 1, device=dev, dtype=torch.int32) * (a // e)
    flops = 2 * a * d * n * 3
    runs = {
        "dense mm [A,D]@[D,N]": lambda: (x @ dense_w).backward(g),
        "grouped W[E,N,D].T": lambda: torch._grouped_mm(x, w_nk.transpose(1, 2), offs=offs).backward(g),
        "grouped W[E,D,N]": lambda: torch._grouped_mm(x, w_kn, offs=offs).backward(g),
        "fwd only grouped W.T": lambda: torch._grouped_mm(x.detach(), w_nk.detach().transpose(1, 2), offs=offs),
        "fwd only dense": lambda: x.detach() @ dense_w.detach(),
    }
    print(f"T*K={a} E={e} D={d} N={n}")
    for name, fn in runs.items():
        ms = bench(fn)
        f = flops / 3 if name.startswith("fwd") else flops
        print(f"  {name:24s} {ms:7.3f} ms  {f / ms / 1e9:7.1f} TFLOP/s")


if __name__ == "__main__":
    main()
