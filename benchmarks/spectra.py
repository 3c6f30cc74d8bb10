"""Spectra during training, side by side in one process:

1. the eigenvalue density of a deep linear network's Hessian: exact (dense torch.func Hessian + eigvalsh) vs
   stochastic Lanczos quadrature (hessian-eigenthings' spectral_density over our HVPs), time and the error of the
   first two moments tr(H^k)/p against the exact spectrum;
2. tracking every eigenvalue above a threshold during training: LOBPCG warm-started from the previous read vs cold
   (random start every read), HVPs per read.

    python benchmarks/spectra.py
"""

from __future__ import annotations

import time

import torch


def main():
    from hessian_eigenthings import LambdaOperator, spectral_density

    from lightning_flat import functional as F
    from lightning_flat.datamodules import MatrixSensingDataModule
    from lightning_flat.models import DeepLinearNet
    from lightning_flat.threads import use_threads

    use_threads(1)
    print(f"torch {torch.__version__}, 1 thread, float64")
    print("| model | params | exact density (s) | SLQ 10 x 80 (s) | HVPs | moment-1 rel err | moment-2 rel err |")
    print("|---|---|---|---|---|---|---|")
    for d, depth in ((10, 3), (20, 3), (30, 4)):
        dm = MatrixSensingDataModule(n=10 * d, d_out=d, d_in=d, rank=2, batch_size=None, seed=0)
        net = DeepLinearNet([d] * (depth + 1), seed=0).double()
        ws = net.weights()
        p = sum(w.numel() for w in ws)
        t = time.perf_counter()
        H = F.loss_hessian([w.detach() for w in ws], dm.measurements, dm.targets)
        lam = torch.linalg.eigvalsh(H)
        t_exact = time.perf_counter() - t
        hvp, w0 = F.loss_hvp(ws, dm.measurements, dm.targets)
        t = time.perf_counter()
        res = spectral_density(LambdaOperator(hvp, p, w0.device, w0.dtype), num_runs=10, lanczos_steps=80,
                               num_grid_points=2, seed=0)
        t_slq = time.perf_counter() - t
        keep = torch.isfinite(res.raw_eigenvalues)
        nodes, weights = res.raw_eigenvalues[keep], res.raw_weights[keep] / 10
        errs = [abs(float((weights * nodes.pow(k)).sum()) / float(lam.pow(k).mean()) - 1) for k in (1, 2)]
        print(f"| d={d} L={depth} | {p} | {t_exact:.3f} | {t_slq:.3f} | 800 | {errs[0]:.1e} | {errs[1]:.1e} |")

    # tracking: the eigenvalues above 2/lr's tenth during 10 SGD steps
    dm = MatrixSensingDataModule(n=200, d_out=20, d_in=20, rank=2, batch_size=None, seed=0)
    net = DeepLinearNet([20, 20, 20], seed=0, lr=0.01).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    X = None
    warm, cold = [], []
    for step in range(10):
        ws = net.weights()
        hvp, w0 = F.loss_hvp(ws, dm.measurements, dm.targets)
        k = 8
        _, X, n_warm = F.top_eigenpairs(hvp, w0.numel(), k, dtype=w0.dtype, device="cpu", X0=X, tol=1e-6)
        _, _, n_cold = F.top_eigenpairs(hvp, w0.numel(), k, dtype=w0.dtype, device="cpu", tol=1e-6, seed=step)
        warm.append(n_warm)
        cold.append(n_cold)
        opt.zero_grad()
        F.measurement_loss(net.end_to_end(), dm.measurements, dm.targets).backward()
        opt.step()
    print(f"\ntracking the top 8 eigenpairs over 10 GD steps (d=20, L=2, 800 params): HVPs per read, warm "
          f"{sum(warm[1:]) / 9:.0f} vs cold {sum(cold[1:]) / 9:.0f} (ratio {sum(cold[1:]) / sum(warm[1:]):.1f}x)")


if __name__ == "__main__":
    main()
