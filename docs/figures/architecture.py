"""Draw docs/architecture.png: the package's layers, the Replicas object, the curvature sources and the step phases.

Run: python docs/figures/architecture.py (matplotlib only)."""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

LAYERS = [  # (name, contents), top to bottom: each layer imports only from the layers below it
    ("cli  ·  sweep  ·  experiments", "the lightning-flat command, grids on a process pool or Ray, example kernels"),
    ("callbacks/", "measuring: HessianTrace, Sharpness, SpectralDensity, EigenvaluesAbove, ... (thin shells)\n"
                   "per-step: LabelNoise, SAM, HyperparameterSchedule, FiniteLossGuard (StepHook phases)"),
    ("curvature/", "CurvatureSource: ClosedFormSource (lightning_flat models)  |  ModuleSource (any module:\n"
                   "HVPs of loss_fn on kept batches, reads isolated)"),
    ("models/  ·  datamodules/  ·  baselines/", "DeepLinearNet, ResidualLinearNet, QuadraticNet (own a Replicas)  |  "
                                                  "measurement\nproblems and samplers (StepPlan in, StepChunk out)  |  "
                                                  "convex solvers"),
    ("engine/", "Replicas (seeds, step-keyed streams, active mask, sums, keys)  |  StepHook phases + one\n"
                "LightningDriver  |  TrainingEngine (fused chunks)  |  ReplicaSGD  |  compat (Lightning internals)"),
    ("functional/  ·  measurements/", "pure tensor functions: closed forms, HVPs, eigen-solvers, spectra, ranks, "
                                      "theory  |\nDense, RankOne, Entries: predictions, adjoints, curvature"),
]
PHASES = ["step_hparams", "step_targets", "loss + grads", "step_gradients", "step_check", "update"]


def main(path: str) -> None:
    fig, ax = plt.subplots(figsize=(11, 7.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 7.6)
    ax.axis("off")
    h, gap, top = 0.82, 0.28, 7.2
    for k, (name, body) in enumerate(LAYERS):
        y = top - (k + 1) * h - k * gap
        ax.add_patch(FancyBboxPatch((0.2, y), 7.6, h, boxstyle="round,pad=0.02", fc="#eef3fb", ec="#35608f"))
        ax.text(0.35, y + h - 0.16, name, fontsize=10.5, weight="bold", va="top", family="monospace")
        ax.text(0.35, y + h - 0.42, body, fontsize=8.2, va="top")
        if k < len(LAYERS) - 1:
            ax.add_patch(FancyArrowPatch((4.0, y), (4.0, y - gap), arrowstyle="-|>", mutation_scale=12,
                                         color="#35608f"))
    ax.text(4.0, 0.05, "arrows: imports (each layer uses only the layers below it)", ha="center", fontsize=8.5,
            style="italic")
    ax.text(9.35, 7.15, "one SGD step", ha="center", fontsize=10.5, weight="bold")
    for k, phase in enumerate(PHASES):
        y = 6.55 - k * 0.78
        hook = phase.startswith("step_")
        ax.add_patch(FancyBboxPatch((8.35, y), 2.0, 0.48, boxstyle="round,pad=0.02",
                                    fc="#fdf0dc" if hook else "#f2f2f2", ec="#b06b00" if hook else "#777777"))
        ax.text(9.35, y + 0.24, phase, ha="center", va="center", fontsize=9, family="monospace")
        if k < len(PHASES) - 1:
            ax.add_patch(FancyArrowPatch((9.35, y), (9.35, y - 0.30), arrowstyle="-|>", mutation_scale=10,
                                         color="#777777"))
    ax.text(9.35, 1.45, "orange: StepHook phases, written once;\nrun by the engine inside fused chunks,\nby the "
            "LightningDriver from Lightning's\nhooks on any other module", ha="center", va="top", fontsize=8)
    fig.savefig(path, dpi=130, bbox_inches="tight")


if __name__ == "__main__":
    main(os.path.join(os.path.dirname(__file__), "..", "architecture.png"))
