"""The README's "Using the callbacks" snippet runs as written (fewer steps), quietly, and writes only under the
output folder it names."""

import os
import re
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.search(r"## Using the callbacks\n\n```python\n(.*?)```", text, re.S).group(1)


def test_readme_snippet_is_quiet_and_contained(tmp_path):
    code = snippet().replace("max_steps=7000", "max_steps=600").replace("(6000, 0.0)", "(500, 0.0)")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=os.path.abspath(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = out.stdout + out.stderr
    assert len(printed) < 20_000, len(printed)  # progress every 500 steps, not every step
    assert "hessian/trace" in printed and "measured" in printed  # the results table at the end
    assert sorted(os.listdir(tmp_path)) == ["outputs"]  # nothing else in the current folder
    assert sorted(os.listdir(tmp_path / "outputs" / "readme")) == ["lightning-flat", "wandb"]
