"""lightning-flat: Lightning callbacks, models and datamodules for flat minima of deep linear networks."""

__version__ = "0.1.0"
