"""What a researcher's own environment meets: the import-time version check, no deprecation or wandb noise from a fit
through the library's code paths, and the built wheel installed (not editable) into a fresh venv that already has
torch, run from outside the repository."""

import glob
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib

import pytest

from lightning_flat._environment import MINIMUM, _release, check_versions

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def test_minimum_versions_are_pyprojects_lower_bounds():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    bounds = dict(re.fullmatch(r"([\w.-]+)(?:\[.*\])?>=(.+)", d).groups() for d in deps)
    assert {name: bounds[name] for name in MINIMUM} == MINIMUM


def test_version_check_names_what_was_found_and_what_is_supported():
    versions = {"torch": "2.2.1+cu121", "lightning": "2.6.0"}
    with pytest.raises(ImportError, match=r"lightning-flat supports torch>=2\.3, found torch 2\.2\.1\+cu121: .*"
                                          r"pip install 'torch>=2\.3'"):
        check_versions(versions.__getitem__)
    versions = {"torch": "2.13.0+cpu", "lightning": "2.4.0"}
    with pytest.raises(ImportError, match=r"supports lightning>=2\.5, found lightning 2\.4\.0: "
                                          r"pip install 'lightning>=2\.5'"):
        check_versions(versions.__getitem__)

    def missing(name):
        if name == "lightning":
            raise md.PackageNotFoundError(name)
        return "2.3.0"

    with pytest.raises(ImportError, match=r"needs lightning>=2\.5, which is not installed for .*python"):
        check_versions(missing)
    found = {"torch": "2.3.0", "lightning": "2.5.0rc1"}  # the bounds themselves, a pre-release of the bound
    assert check_versions(found.__getitem__) == found
    assert check_versions() == {"torch": md.version("torch"), "lightning": md.version("lightning")}


QUIET_FIT = """
import lightning as L
from lightning_flat.datamodules import MatrixSensingDataModule
from lightning_flat.loggers import WandbLogger
from lightning_flat.models import DeepLinearNet

dm = MatrixSensingDataModule(n=40, d_out=4, d_in=3, rank=1, batch_size=8, seed=0)
logger = WandbLogger(project="lightning-flat", save_dir="outputs/new/folder", offline=True)
tr = L.Trainer(max_steps=20, logger=logger, precision="64-true", enable_checkpointing=False,
               enable_model_summary=False, enable_progress_bar=False)
tr.fit(DeepLinearNet([3, 5, 4], lr=0.02), dm)
logger.experiment.finish()
"""


def test_a_fit_through_the_library_prints_no_deprecation_or_wandb_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "PYTHONWARNINGS")}
    env.update(WANDB_MODE="offline", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-W", "default", "-c", QUIET_FIT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert "wandb: Tracking run" in printed or "offline" in printed  # wandb did speak: it was not silenced
    for noise in ("LeafSpec", "FutureWarning", "DeprecationWarning", "anonymous", "git root"):
        assert noise not in printed, (noise, printed[-3000:])
    assert glob.glob(str(tmp_path / "outputs" / "new" / "folder" / "wandb" / "offline-run-*"))


def test_lightning_builds_leaf_specs_with_torchs_replacement():
    import torch.utils._pytree as torch_pytree
    from lightning.pytorch.utilities import _pytree as lightning_pytree

    import lightning_flat.models  # noqa: F401  (applies it)

    flat, spec = lightning_pytree._tree_flatten(object())  # what CombinedLoader does with one dataloader
    assert len(flat) == 1 and spec.is_leaf()
    if hasattr(torch_pytree, "treespec_leaf"):
        assert lightning_pytree.LeafSpec is torch_pytree.treespec_leaf


def test_wandb_logger_passes_anonymous_only_when_given(tmp_path):
    from lightning_flat.loggers import WandbLogger

    assert "anonymous" not in WandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init
    assert WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"


@pytest.mark.slow
def test_built_wheel_runs_the_drop_in_example_and_the_cli_outside_the_repository(tmp_path):
    """pip wheel, then a fresh venv that sees this environment's packages (torch and the dependencies, as a user's
    own environment would have them) but not the repository: the wheel installed there, not editable."""
    dist = tmp_path / "dist"
    try:  # build with this environment's setuptools where it meets pyproject.toml's build requirement (no download)
        isolation = [] if _release(md.version("setuptools")) < (68,) else ["--no-build-isolation"]
    except md.PackageNotFoundError:
        isolation = []
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet", "-w", str(dist),
                            ROOT], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = glob.glob(str(dist / "lightning_flat-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # this environment's packages on the new venv's path (after its own site-packages); the .pth files there (the
    # editable install of the repository among them) are not read
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(ours + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet",
                                "--no-index", wheel], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    where = subprocess.run([python, "-c", "import lightning_flat, torch; print(lightning_flat.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(site), where.stdout + where.stderr  # the wheel's copy, not the repo
    run = subprocess.run([python, os.path.join(ROOT, "examples", "drop_in.py"), "--steps", "60", "--out", "drop"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    trace = [line for line in run.stdout.splitlines() if line.startswith("hessian/trace ")]
    assert len(trace) == 1 and re.findall(r"(\d+):", trace[0]) == ["0", "50", "60"], run.stdout[-2000:]
    cli = str(env_dir / "bin" / "lightning-flat")
    helped = subprocess.run([cli, "--help"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "DeepLinearNet" in helped.stdout and "fit --help" in helped.stdout
    config = os.path.join(ROOT, "examples", "gatmiry2023", "quick.yaml")
    fitted = subprocess.run([cli, "fit", "--config", config, "--trainer.max_steps=40", "--trainer.logger=false"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    assert "done, step 40/40" in fitted.stdout and "hessian/trace" in fitted.stdout + fitted.stderr  # the table
    assert sorted(os.listdir(work)) == ["drop"]  # the CLI run without a logger wrote nothing here
