r"""Flat minima of low-rank matrix recovery (Ding, Drusvyatskiy, Fazel 2022), library normalization.

For the depth-2 factorization $E = LR^\top$ (``DeepLinearNet`` with ``W_1 = R^\top``, ``W_2 = L``) and the loss
$\frac1n\sum_i(\langle A_i, LR^\top\rangle - b_i)^2$, the Hessian trace at **every** point is
$2(d_{in}\|D_1L\|_F^2 + d_{out}\|D_2R\|_F^2)$ with the rescaling matrices

$$
D_1 = \Big(\frac{1}{n\,d_{in}}\sum_i A_iA_i^\top\Big)^{1/2},\qquad
D_2 = \Big(\frac{1}{n\,d_{out}}\sum_i A_i^\top A_i\Big)^{1/2},
$$

so flat minima minimize $\|D_1XD_2\|_*$ over interpolants (their eq. 4; the convex relaxation, eq. 5, drops
the rank constraint). The paper's losses in Sections 2-6 are sums (``m`` times ours); its traces are ours times ``m``.

References:
    Ding, Drusvyatskiy, Fazel (2022), "Flat minima generalize for low-rank matrix recovery", Lemma 3.1, Thm 3.2,
    Thm 3.3, Lemma 7.2 (whose 4d should read 8d), Thm 7.5.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_flat.functional.spectral import nuclear_norm
from lightning_flat.functional.theory import psd_sqrt
from lightning_flat.measurements import Measurements

__all__ = ["rescaling_matrices", "is_singular", "condition_number", "flat_factors", "scaled_trace",
           "flatness_measures", "quadratic_hessian_trace"]


def rescaling_matrices(measurements: Measurements) -> tuple[Tensor, Tensor]:
    r"""``(D1, D2)``: $D_1 = (\frac{1}{n d_{in}}\sum_i A_iA_i^\top)^{1/2}$ (``d_out x d_out``) and
    $D_2 = (\frac{1}{n d_{out}}\sum_i A_i^\top A_i)^{1/2}$ (``d_in x d_in``); symmetric square roots by
    ``eigh`` with eigenvalues clipped at 0, from each class's structure (diagonal counts for ``Entries``)."""
    S1, S2 = measurements.second_moments()
    n, (d_out, d_in) = len(measurements), measurements.shape
    return psd_sqrt(S1 / (n * d_in)), psd_sqrt(S2 / (n * d_out))


def is_singular(D: Tensor, rtol: float = 1e-12) -> bool:
    r"""True when $\lambda_{min}(D^2) \le \mathrm{rtol}\,\lambda_{max}(D^2)$ (e.g. completion with an empty
    row, or fewer rank-one measurements than the dimension)."""
    ev = torch.linalg.eigvalsh(D @ D)
    return bool(ev[0] <= rtol * ev[-1])


def condition_number(D1: Tensor, D2: Tensor) -> Tensor:
    r"""$\kappa = \max(\lambda_{max}(D_1), \lambda_{max}(D_2)) / \min(\lambda_{min}(D_1), \lambda_{min}(D_2))$
    (joint over both, of D, not D^2; Thm 3.3)."""
    e1, e2 = torch.linalg.eigvalsh(D1), torch.linalg.eigvalsh(D2)
    return torch.maximum(e1[-1], e2[-1]) / torch.minimum(e1[0], e2[0])


def flat_factors(Y: Tensor, D1: Tensor, D2: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
    r"""The flat factors of the solution ``Y = D1 X D2`` of the relaxation: with the SVD $Y = USV^\top$,
    $L_f = D_1^{-1}US^{1/2}$, $R_f = D_2^{-1}VS^{1/2}$ (``k`` columns, zero-padded or cut; default all).
    They are exactly D-balanced: $L_f^\top D_1^2L_f = R_f^\top D_2^2R_f$."""
    U, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    root = s.sqrt()
    Lf = torch.linalg.solve(D1, U * root)
    Rf = torch.linalg.solve(D2, Vh.T * root)
    if k is not None:
        pad = k - Lf.shape[1]
        if pad > 0:
            Lf = torch.cat([Lf, Lf.new_zeros(Lf.shape[0], pad)], 1)
            Rf = torch.cat([Rf, Rf.new_zeros(Rf.shape[0], pad)], 1)
        else:
            Lf, Rf = Lf[:, :k], Rf[:, :k]
    return Lf, Rf


def scaled_trace(L: Tensor, R: Tensor, D1: Tensor, D2: Tensor) -> Tensor:
    r"""The scaled trace (their eq. 2) in library units, $\mathrm{str}(L, R) = 2(\|D_1L\|_F^2 + \|D_2R\|_F^2)$:
    the L-block of the Hessian trace divided by ``d_out`` plus the R-block divided by ``d_in``."""
    return 2.0 * ((D1 @ L).square().sum() + (D2 @ R).square().sum())


def flatness_measures(L: Tensor, R: Tensor, X_nuc: Tensor, M: Tensor) -> dict[str, Tensor]:
    r"""Fig. 4's measures of flat factors: norm-minimality
    $(\|L\|_F^2 + \|R\|_F^2)/(2\|X_{nuc}\|_*) - 1$ (0 for the norm-minimal factors of $X_{nuc}$) and
    balance $\|L^\top L - R^\top R\|_* / \|M\|_*$."""
    normmin = (L.square().sum() + R.square().sum()) / (2.0 * nuclear_norm(X_nuc)) - 1.0
    balance = nuclear_norm(L.T @ L - R.T @ R) / nuclear_norm(M)
    return {"normmin": normmin, "balance": balance}


def quadratic_hessian_trace(U1: Tensor, U2: Tensor, measurements: Measurements, targets: Tensor) -> Tensor:
    r"""Exact Hessian trace of $\frac1n\sum_i(\langle A_i, U_1U_1^\top - U_2U_2^\top\rangle - b_i)^2$ in
    $(U_1, U_2)$ for symmetric $A_i$ (quadratic sensing, ``RankOne(x, x)``):

    $$
    \frac8n\sum_i(\|A_iU_1\|_F^2 + \|A_iU_2\|_F^2) + \frac4n(k_1 - k_2)\sum_i r_i \operatorname{tr}(A_i),
    \qquad r_i = \langle A_i, E\rangle - b_i
    $$

    (prediction minus target). For $A_i = x_ix_i^\top$ the first part is $8d(\|DU_1\|^2 + \|DU_2\|^2)$
    (Lemma 7.2 with 8d: the paper's 4d is a factor-2 slip). Off the solution set the residual term is non-zero when
    $k_1 \ne k_2$. Differentiable; leading replica dimensions broadcast.
    """
    n = len(measurements)
    d = U1.shape[-2]
    eye = torch.eye(d, dtype=U1.dtype, device=U1.device)
    gn = measurements.curvature(eye, U1 @ U1.transpose(-1, -2), symmetric=True) + \
        measurements.curvature(eye, U2 @ U2.transpose(-1, -2), symmetric=True)
    E = U1 @ U1.transpose(-1, -2) - U2 @ U2.transpose(-1, -2)
    r = measurements(E) - targets
    k1, k2 = U1.shape[-1], U2.shape[-1]
    return (8.0 / n) * gn + (4.0 / n) * (k1 - k2) * (r * measurements.traces().to(r.dtype)).sum(-1)
