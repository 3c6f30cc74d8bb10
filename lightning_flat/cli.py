"""The ``lightning-flat`` command: Lightning's CLI over the lightning_flat models and datamodules.

``lightning-flat fit --config examples/gatmiry2023/quick.yaml`` trains the model and datamodule named in the YAML
(``class_path`` + ``init_args``, any LightningModule/LightningDataModule importable by path) with the trainer,
callbacks and loggers given there. wandb runs offline unless ``WANDB_MODE`` says otherwise. It runs one intra-op
thread (faster for these tiny models, see [`lightning_flat.threads`][lightning_flat.threads]) unless
``LIGHTNING_FLAT_THREADS`` or ``OMP_NUM_THREADS`` says otherwise. A config that names no progress bar gets a
[`StepProgressBar`][lightning_flat.callbacks.StepProgressBar] (a line every 1000 steps when stdout is not a terminal).
``lightning-flat --help`` lists what the library offers before Lightning's own help.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["main", "overview", "run"]

_HELP = ("-h", "--help")


#: LaTeX commands that read as other text in a one-line summary (any other command reads as its name)
_LATEX_NAMES = {"cdots": "...", "top": "T", "langle": "<", "rangle": ">", "sim": "~", "varepsilon": "eps",
                "epsilon": "eps"}


def _summary(obj: object) -> str:
    """The first sentence of ``obj``'s docstring as plain text (no roles or cross-references, backquotes, math
    delimiters or LaTeX commands)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    text = doc.split("\n\n")[0].replace("\n", " ").split(". ")[0].rstrip(".")
    text = re.sub(r":math:`([^`]*)`", r"\1", text)
    text = re.sub(r"\$([^$]*)\$", r"\1", text)  # Markdown math
    text = re.sub(r":[a-z]+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", text)
    text = re.sub(r"\[`?([^`\]]+)`?\]\[[^\]]*\]", r"\1", text)  # Markdown cross-references
    text = text.replace("``", "")
    text = re.sub(r"\\mathrm\{(\w+)\}", r"\1", text.replace("\\|", "||"))
    text = re.sub(r"\\([A-Za-z]+)", lambda m: _LATEX_NAMES.get(m.group(1), m.group(1)) + " ", text)
    text = re.sub(r" +([_^,)>|])", r"\1", re.sub(r"[{}]", "", text))  # no space before a subscript or a closer
    return " ".join(text.split())


def overview(width: int = 118) -> str:
    """What ``lightning-flat --help`` prints before Lightning's help: the library's models, datamodules and
    callbacks (each with the first sentence of its docstring), the example configs, and where the options are."""
    from lightning.pytorch import Callback, LightningDataModule, LightningModule

    import lightning_flat.callbacks as callbacks
    import lightning_flat.datamodules as datamodules
    import lightning_flat.models as models

    lines = ["lightning-flat: Lightning models, datamodules and callbacks for flat minima of deep linear networks.",
             "", "usage: lightning-flat fit --config CONFIG.yaml [--section.option VALUE ...]", ""]
    for title, module, kind, key in (("models", models, LightningModule, "model"),
                                     ("datamodules", datamodules, LightningDataModule, "data"),
                                     ("callbacks", callbacks, Callback, "trainer.callbacks")):
        lines.append(f"{title} (in the YAML: {key}: class_path: {module.__name__}.NAME):")
        for name in module.__all__:
            obj = getattr(module, name)
            summary = _summary(obj)
            if not (isinstance(obj, type) and issubclass(obj, kind)) or summary.startswith("Base of"):
                continue  # base classes and helpers are not for a config
            line = f"  {name:<31}{summary}"
            lines.append(line if len(line) <= width else line[:width - 3] + "...")
        lines.append("")
    lines += ["example configs: examples/*/*.yaml, e.g. examples/gatmiry2023/quick.yaml (label-noise SGD, d = 20)",
              "every option of the model, data and trainer: lightning-flat fit --help",
              "  (one class's options: lightning-flat fit --model lightning_flat.models.DeepLinearNet --help)",
              "", "Lightning's command line:", ""]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """The console command: ``lightning-flat fit --config ...`` (``args`` default to the command line)."""
    run(args)


def run(args: list[str] | None = None):
    """Run the command on ``args`` (default: the command line) and return the ``LightningCLI`` (its ``model``,
    ``datamodule`` and ``trainer``)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    given = sys.argv[1:] if args is None else list(args)
    if not given or (len(given) == 1 and given[0] in _HELP):
        print(overview(), flush=True)
        if not given:
            args = ["--help"]  # then Lightning's help (subcommands, --config), which exits
    from lightning_flat.threads import use_threads

    use_threads()
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    import lightning_flat.callbacks  # noqa: F401  (short names resolvable in YAML)
    import lightning_flat.datamodules  # noqa: F401
    import lightning_flat.models  # noqa: F401
    from lightning_flat.callbacks import StepProgressBar

    class _SaveConfig(SaveConfigCallback):
        """Saves the resolved config beside the logger's files; a run without a logger has no folder of its own
        (its log_dir is the working directory), so nothing is written there: a config.yaml of the user's own
        in that folder is never overwritten."""

        def setup(self, trainer, pl_module, stage):
            if trainer.logger is None:
                return
            super().setup(trainer, pl_module, stage)

    class _CLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            # Lightning adds a TQDMProgressBar when the config names no progress bar; it redraws with carriage
            # returns even into a log file. That default one (not a configured one) becomes a StepProgressBar.
            key = f"{self.subcommand}.trainer.callbacks" if self.subcommand else "trainer.callbacks"
            configured = self.config_init.get(key) or []
            configured = list(configured) if isinstance(configured, list) else [configured]  # before Lightning adds
            trainer = super().instantiate_trainer(**kwargs)
            bar = trainer.progress_bar_callback
            if type(bar) is TQDMProgressBar and not any(c is bar for c in configured):
                trainer.callbacks[trainer.callbacks.index(bar)] = StepProgressBar()
            return trainer

    cli = _CLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,  # None: LightningCLI reads the command line itself
        save_config_callback=_SaveConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    import wandb

    if wandb.run is not None:  # a WandbLogger's run: close it (flushes it to disk; a next call starts its own)
        wandb.finish()
    return cli


if __name__ == "__main__":  # pragma: no cover
    main()
