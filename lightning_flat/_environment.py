"""What lightning_flat needs from its environment.

- `check_versions` runs when the package is imported: an unsupported torch or Lightning stops the import with
  a message that names what was found, what is supported and how to install it (the bounds are pyproject.toml's,
  tested at both ends by ``scripts/test_versions.sh``).
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from collections.abc import Callable

__all__ = ["MINIMUM", "check_versions"]

#: The oldest supported releases (pyproject.toml's lower bounds; a test keeps the two equal).
MINIMUM = {"torch": "2.3", "lightning": "2.5"}

_INSTALL = {
    "torch": "install the torch build for your machine (CPU or your CUDA version, as pytorch.org's selector gives "
             "it), e.g. pip install 'torch>={v}'",
    "lightning": "pip install 'lightning>={v}'",
}


def _release(version: str) -> tuple[int, ...]:
    m = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def check_versions(version: Callable[[str], str] = md.version) -> dict[str, str]:
    """Check that the installed torch and Lightning are supported (``version(name)`` reads an installed
    distribution's version); returns them. Raises ImportError naming the package, the version found and the one
    needed."""
    found = {}
    for name, minimum in MINIMUM.items():
        try:
            found[name] = version(name)
        except md.PackageNotFoundError:
            raise ImportError(f"lightning-flat needs {name}>={minimum}, which is not installed for {sys.executable}: "
                              + _INSTALL[name].format(v=minimum)) from None
        have, need = _release(found[name]), _release(minimum)
        if have[:len(need)] < need:
            raise ImportError(f"lightning-flat supports {name}>={minimum}, found {name} {found[name]}: "
                              + _INSTALL[name].format(v=minimum))
    return found
