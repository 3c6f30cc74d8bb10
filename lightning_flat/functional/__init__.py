"""Pure tensor functions (no Lightning): curvature, spectra, balance, ranks, norms and theory bounds.

Import as ``from lightning_flat import functional as F``.
"""

from lightning_flat.functional.balance import balancedness
from lightning_flat.functional.curvature import (
    end_to_end,
    flatten_weights,
    hessian_trace,
    loss_hessian,
    loss_hvp,
    measurement_loss,
    partial_products,
    sharpness,
    top_hessian_eigenpair,
    trace_surrogate,
    unflatten_weights,
)
from lightning_flat.functional.regression import (
    conserved_gaps,
    epsilon_gd,
    ideal_minimizer,
    ideal_minimizer_sharpness,
    least_squares,
    minimizer_sharpness,
    sharpness_lower_bound,
    sharpness_upper_bound,
)
from lightning_flat.functional.sam import sam_gradient, sam_perturbation
from lightning_flat.functional.spectral import (
    effective_rank,
    nuclear_norm,
    representation_cost,
    schatten_norm,
    singular_values,
)
from lightning_flat.functional.theory import (
    depth2_flattest_factorization,
    depth2_min_trace,
    fiber_stationarity_residual,
    flattest_factorization,
    lemma3_ratio,
    measurement_covariances,
    min_frobenius_interpolant,
    min_trace_on_fiber,
    min_trace_surrogate,
    n1_min_trace,
    predicted_min_trace,
    psd_sqrt,
)

__all__ = [
    "balancedness",
    "conserved_gaps",
    "depth2_flattest_factorization",
    "depth2_min_trace",
    "effective_rank",
    "end_to_end",
    "epsilon_gd",
    "fiber_stationarity_residual",
    "flatten_weights",
    "flattest_factorization",
    "hessian_trace",
    "ideal_minimizer",
    "ideal_minimizer_sharpness",
    "least_squares",
    "lemma3_ratio",
    "loss_hessian",
    "loss_hvp",
    "measurement_covariances",
    "measurement_loss",
    "min_frobenius_interpolant",
    "min_trace_on_fiber",
    "min_trace_surrogate",
    "minimizer_sharpness",
    "n1_min_trace",
    "nuclear_norm",
    "partial_products",
    "predicted_min_trace",
    "psd_sqrt",
    "representation_cost",
    "sam_gradient",
    "sam_perturbation",
    "schatten_norm",
    "sharpness",
    "sharpness_lower_bound",
    "sharpness_upper_bound",
    "singular_values",
    "top_hessian_eigenpair",
    "trace_surrogate",
    "unflatten_weights",
]
