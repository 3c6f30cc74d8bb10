r"""Sharpness-aware minimization (SAM) as pure functions: the ascent perturbation and the SAM descent gradient.

n-SAM takes one ascent step on the whole batch gradient; m-SAM splits the batch into chunks of ``m`` examples with
one ascent each; 1-SAM is ``m = 1`` (per-example ascent, vectorised with ``torch.func.vmap``):

$$
g_c = \nabla L_c(W), \qquad \varepsilon_c = \rho\,\frac{T^2 g_c}{\|T g_c\|}, \qquad
\text{descent gradient} = \sum_c \frac{|c|}{B}\,\nabla L_c(W + \varepsilon_c),
$$

with $T = I$ for SAM and $T = \mathrm{diag}(|W| + \eta)$ for adaptive SAM (ASAM); without normalization
$\varepsilon_c = \rho\,T^2 g_c$. The norm runs over all parameters of one model; a leading replica dimension
(``replica_dims``) keeps independent models apart.

References:
    Foret, Kleiner, Mobahi, Neyshabur (2021), "Sharpness-aware minimization for efficiently improving
    generalization". Kwon, Kim, Park, Choi (2021), "ASAM". Andriushchenko & Flammarion (2022), "Towards understanding
    sharpness-aware minimization" (m-SAM, 1-SAM, unnormalized SAM).

See Also:
    [`lightning_flat.callbacks.SAM`][lightning_flat.callbacks.SAM], the Lightning shell over these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["sam_perturbation", "sam_gradient"]


def sam_perturbation(grads: Sequence[Tensor], rho: float, *, params: Sequence[Tensor] | None = None,
                     adaptive: bool = False, normalize: bool = True, eta: float = 0.01,
                     replica_dims: int = 0) -> list[Tensor]:
    r"""The SAM ascent step $\varepsilon = \rho\,T^2 g / \|T g\|$ (or $\rho\,T^2 g$ unnormalized).

    Args:
        grads: gradients ``g`` at the current point, one per parameter.
        rho: ascent radius.
        params: the parameters ``W`` (needed for ``adaptive``: $T = |W| + \eta$).
        adaptive: ASAM's elementwise scaling.
        normalize: divide by the norm (SAM) or not (unnormalized SAM).
        eta: ASAM's offset.
        replica_dims: leading dimensions of every tensor that index independent models; the norm is taken per model.

    A zero gradient gives a zero perturbation. Pure tensor code: works under ``torch.func.vmap``.

    Examples:
        >>> sam_perturbation([torch.tensor([3.0, 4.0])], rho=0.5)
        [tensor([0.3000, 0.4000])]
    """
    if adaptive:
        if params is None:
            raise ValueError("adaptive SAM needs params (T = |W| + eta)")
        T = [p.detach().abs() + eta for p in params]
        scaled = [t * g for t, g in zip(T, grads)]
        direction = [t * s for t, s in zip(T, scaled)]
    else:
        scaled = direction = list(grads)
    if not normalize:
        return [rho * d for d in direction]
    sq = None
    for s in scaled:
        term = s.square().reshape(*s.shape[:replica_dims], -1).sum(-1)
        sq = term if sq is None else sq + term
    norm = sq.sqrt()
    factor = rho / torch.where(norm > 0, norm, torch.ones_like(norm))
    factor = torch.where(norm > 0, factor, torch.zeros_like(factor))
    return [d * factor.reshape(*factor.shape, *([1] * (d.ndim - replica_dims))) for d in direction]


def _split(tree: dict[str, Tensor], m: int) -> tuple[dict[str, Tensor], dict[str, Tensor] | None, int]:
    """``(chunks, remainder, n)``: leaves reshaped to ``(B // m, m, ...)`` and the last ``B % m`` examples."""
    n = next(iter(tree.values())).shape[0]
    full = (n // m) * m
    chunks = {k: v[:full].reshape(n // m, m, *v.shape[1:]) for k, v in tree.items()} if full else None
    rest = {k: v[full:] for k, v in tree.items()} if full < n else None
    return chunks, rest, n


def sam_gradient(loss_at: Callable[[Sequence[Tensor], Any], Tensor], params: Sequence[Tensor], tree: dict[str, Tensor],
                 rebuild: Callable[[dict[str, Tensor]], Any], rho: float, m: int, *, adaptive: bool = False,
                 normalize: bool = True, eta: float = 0.01, replica_dims: int = 0) -> list[Tensor]:
    r"""m-SAM descent gradient $\sum_c \frac{|c|}{B}\nabla L_c(W + \varepsilon_c)$ over chunks of ``m`` examples.

    ``loss_at(params, batch)`` is the mean loss of a batch as a pure function of the parameter tensors; ``tree`` holds
    the batch as a dict of tensors with the examples along dim 0 and ``rebuild(tree)`` turns (a chunk of) it back
    into a batch. Full chunks go through ``vmap(grad(...))`` twice (ascent and descent); a last, shorter chunk is
    handled on its own. ``m = 1`` is 1-SAM.
    """
    from torch.func import grad, vmap

    params = [p.detach() for p in params]

    def chunk_loss(ps, chunk):
        return loss_at(ps, rebuild(chunk))

    g_fn = grad(chunk_loss)

    def descent(ps, chunk):
        g = g_fn(ps, chunk)
        eps = sam_perturbation(g, rho, params=ps, adaptive=adaptive, normalize=normalize, eta=eta,
                               replica_dims=replica_dims)
        return g_fn([p + e for p, e in zip(ps, eps)], chunk)

    chunks, rest, n = _split(tree, m)
    total = [torch.zeros_like(p) for p in params]
    if chunks is not None:
        per_chunk = vmap(descent, in_dims=(None, 0), randomness="different")(list(params), chunks)
        total = [t + g.sum(0) * (m / n) for t, g in zip(total, per_chunk)]
    if rest is not None:
        r = next(iter(rest.values())).shape[0]
        total = [t + g * (r / n) for t, g in zip(total, descent(list(params), rest))]
    return total
