"""pyproject.toml's dependencies (runtime, [dev] and [docs]) pinned at their lower bounds, as a constraints file on
stdout (``name>=X`` becomes ``name==X``), or with ``--installed`` the versions installed in this interpreter's environment.
Used by scripts/test_versions.sh."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import re
import sys
import tomllib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHOWN = ["torch", "lightning", "torchmetrics", "hessian-eigenthings", "wandb", "jsonargparse", "cvxpy", "matplotlib",
         "numpy", "scipy", "mkdocs", "mkdocstrings", "mkdocstrings-python", "griffe|griffelib", "pytest"]


def requirements() -> list[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    own = project["name"]
    return [r for r in project["dependencies"] + extras["dev"] + extras["docs"] if not r.startswith(own)]


def lower_bounds() -> list[tuple[str, str]]:
    out = []
    for req in requirements():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?>=([^,;]+)", req.replace(" ", ""))
        if not m:
            raise SystemExit(f"every dependency needs one lower bound 'name>=version', got {req!r}")
        out.append((m.group(1), m.group(3)))
    return out


def installed() -> str:
    def version(names: str) -> str:  # the first of "a|b" that is installed
        for name in names.split("|"):
            try:
                return f"{name} {md.version(name)}"
            except md.PackageNotFoundError:
                pass
        return f"{names.split('|')[0]} -"

    return f"python {platform.python_version()}, " + ", ".join(version(n) for n in SHOWN)


if __name__ == "__main__":
    if sys.argv[1:] == ["--installed"]:
        print(installed())
    else:
        print("\n".join(f"{name}=={version}" for name, version in lower_bounds()))
