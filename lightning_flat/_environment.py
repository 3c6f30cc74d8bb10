"""What lightning_flat needs from its environment.

- :func:`check_versions` runs when the package is imported: an unsupported torch or Lightning stops the import with
  a message that names what was found, what is supported and how to install it (the bounds are pyproject.toml's,
  tested at both ends by ``scripts/test_versions.sh``).
- :func:`use_leaf_spec_function` removes a deprecation warning that every ``Trainer.fit`` prints with a torch that
  deprecates ``LeafSpec`` (2.13 does) and Lightning up to 2.6: Lightning's ``CombinedLoader`` builds
  ``torch.utils._pytree.LeafSpec()``, whose construction torch deprecates in favour of ``treespec_leaf()`` (which
  returns the same leaf spec). It points that one name in Lightning's ``lightning.pytorch.utilities._pytree`` at
  ``treespec_leaf``, only where torch has it and Lightning still uses the deprecated class; the subpackages that
  import Lightning call it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from collections.abc import Callable

__all__ = ["MINIMUM", "check_versions", "use_leaf_spec_function"]

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


def use_leaf_spec_function() -> bool:
    """Let Lightning build leaf specs with torch's ``treespec_leaf`` instead of the deprecated ``LeafSpec()``;
    returns whether it changed anything (False with a torch or Lightning that does not need it)."""
    from torch.utils import _pytree as torch_pytree

    try:
        from lightning.pytorch.utilities import _pytree as lightning_pytree
    except ImportError:  # a Lightning without this module does not build LeafSpec
        return False
    leaf = getattr(torch_pytree, "treespec_leaf", None)
    if leaf is None or getattr(lightning_pytree, "LeafSpec", None) is not getattr(torch_pytree, "LeafSpec", None):
        return False
    lightning_pytree.LeafSpec = leaf
    return True
