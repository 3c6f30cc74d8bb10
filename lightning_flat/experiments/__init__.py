"""What the example scripts share, importable by their worker processes: check tables
([`checks`][lightning_flat.experiments.checks]), the training frame ([`training`][lightning_flat.experiments.training]),
a step recorder ([`recording`][lightning_flat.experiments.recording]), the command-line frame
([`scripts`][lightning_flat.experiments.scripts]) and the recovery kernel of Ding et al.'s grid
([`recovery`][lightning_flat.experiments.recovery])."""
