"""lightning-flat: Lightning callbacks, models and datamodules for flat minima of deep linear networks."""

from lightning_flat._environment import check_versions as _check_versions

__version__ = "0.1.0"
__all__ = ["__version__", "default_threads", "use_threads"]

_check_versions()


def __getattr__(name: str):
    # lightning_flat.use_threads() without importing torch when the package is imported
    if name in ("default_threads", "use_threads"):
        from lightning_flat import threads

        return getattr(threads, name)
    raise AttributeError(f"module 'lightning_flat' has no attribute {name!r}")
