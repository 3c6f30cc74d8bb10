"""The command-line frame the example scripts share: their common options, the output folder, ``--replot`` from a
saved results file, and the closing wandb report."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["example_parser", "list_written", "output_dir", "replot", "report", "start"]


def example_parser(doc: str, name: str, *, quick_help: str, sweep_noun: str, workers_help: str,
                   replot_help: str = "redraw the figures from a results.json", replot_metavar: str = "RESULTS_JSON",
                   threads: bool = True,
                   wandb: bool = True, workers_default: int | None = None) -> argparse.ArgumentParser:
    """A parser with the options every example has: ``--quick``, ``--out`` (default ``outputs/<name>[_quick]``),
    ``--workers``, ``--replot`` and the sweep's ``--engine/--address/--resume``
    ([`add_sweep_arguments`][lightning_flat.sweep.add_sweep_arguments], for the ``sweep_noun``), and unless switched off
    ``--threads`` and ``--no-wandb``. The description is the first paragraph of ``doc``."""
    from lightning_flat.sweep import add_sweep_arguments

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=None, help=f"output folder (default outputs/{name}[_quick])")
    p.add_argument("--workers", type=int, default=workers_default, help=workers_help)
    if threads:
        p.add_argument("--threads", type=int, default=None,
                       help="intra-op threads per process (default 1, or LIGHTNING_FLAT_THREADS / OMP_NUM_THREADS)")
    if wandb:
        p.add_argument("--no-wandb", action="store_true", help="skip the wandb runs")
    p.add_argument("--replot", metavar=replot_metavar, default=None, help=replot_help)
    add_sweep_arguments(p, sweep_noun)
    return p


def output_dir(out: str | None, name: str, quick: bool) -> str:
    """The example's output folder (``out``, else ``outputs/<name>`` or ``outputs/<name>_quick``), checked for
    writing now, so that a run fails at once, naming it, rather than after training."""
    from lightning_flat.io import output_folder

    path = out or os.path.join("outputs", f"{name}_quick" if quick else name)
    output_folder(path)
    return path


def start(args: argparse.Namespace, name: str) -> tuple[str, float]:
    """Begin a run of an example: a quiet process with ``args.threads`` threads
    ([`lightning_flat.experiments.training.quiet`][lightning_flat.experiments.training.quiet]), the output folder
    ([`output_dir`][lightning_flat.experiments.scripts.output_dir] from ``args.out`` and ``args.quick``), and the start
    time (``time.perf_counter()``)."""
    import time

    from lightning_flat.experiments.training import quiet

    quiet(getattr(args, "threads", None))
    return output_dir(args.out, name, args.quick), time.perf_counter()


def replot(path: str, out: str | None, draw: Callable[[dict, str], list[str]]) -> dict[str, Any]:
    """Redraw an earlier run's figures from its JSON results at ``path``: ``draw(results, folder)`` writes them in
    ``out`` (default: next to ``path``). Prints and returns the figures' paths (``{"figures", "checks": []}``)."""
    with open(path) as f:
        results = json.load(f)
    paths = draw(results, out or os.path.dirname(os.path.abspath(path)))
    print(f"wrote {', '.join(paths)}")
    return dict(figures=paths, checks=[])


def report(out: str, name: str, quick: bool, config: dict[str, Any], figures: Sequence[str],
           checks: Sequence[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The example's closing offline wandb run ``<name>[-quick]-report`` (figures, checks table, final values; see
    [`lightning_flat.loggers.wandb_report`][lightning_flat.loggers.wandb_report]), grouped with its training runs by the
    output folder's name."""
    from lightning_flat.experiments.training import wandb_group
    from lightning_flat.loggers import wandb_report

    return wandb_report(out, f"{name}{'-quick' if quick else ''}-report", config, figures, checks, summary,
                        group=wandb_group(out))


def list_written(out: str, written: Sequence[tuple[str, str]], *, wandb: bool = False) -> list[str]:
    """Print what a run wrote under ``out``: each ``(path, what)`` of ``written`` on a line of its own (and, with
    ``wandb``, how to upload the offline runs). Returns the paths."""
    print(f"\nwritten under {out}{os.sep}:")
    width = max(len(p) for p, _ in written)
    for p, what in written:
        print(f"  {p:<{width}}  {what}")
    if wandb:
        print(f"  (upload a wandb run with: wandb sync {os.path.join(out, 'wandb', 'offline-run-*')})")
    return [p for p, _ in written]
