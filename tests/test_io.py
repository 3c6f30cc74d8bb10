"""Atomic writes: the file appears whole, with the permissions an ordinary open() gives, and nothing is left
behind on failure."""

import os

import pytest

from lightning_flat.io import atomic_path, write_json


def test_written_files_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a" / "r.json", {"x": float("nan")})
        assert os.stat(path).st_mode & 0o777 == 0o644  # 0o666 & ~0o022, not mkstemp's 0o600
        import matplotlib

        matplotlib.use("Agg")
        from lightning_flat.plotting import figure, save

        fig, _ = figure(1, 1)
        png = save(fig, tmp_path / "f.png")
        assert os.stat(png).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "a")) == ["r.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash while writing")
    assert path.read_text().strip().replace("\n", "").replace(" ", "") == '{"v":1}'
    assert os.listdir(tmp_path) == ["r.json"]
