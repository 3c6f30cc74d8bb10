"""The examples' command-line frame: their common options, the output folder and --replot from a saved file."""

import json
import os

import pytest

from lightning_flat.experiments.scripts import example_parser, output_dir, replot, start


def test_common_options_and_their_defaults():
    p = example_parser("An example.\n\nMore.", "demo", quick_help="small", sweep_noun="things", workers_help="procs")
    args = p.parse_args([])
    assert (args.quick, args.out, args.workers, args.threads, args.no_wandb, args.replot) == (
        False, None, None, None, False, None)
    assert (args.engine, args.address, args.resume) == ("local", None, False)
    args = p.parse_args(["--quick", "--out", "x", "--workers", "3", "--threads", "2", "--no-wandb", "--replot",
                         "r.json", "--engine", "ray", "--resume"])
    assert (args.quick, args.out, args.workers, args.threads, args.no_wandb, args.replot, args.engine, args.resume) == (
        True, "x", 3, 2, True, "r.json", "ray", True)
    assert p.description == "An example."


def test_options_an_example_leaves_out():
    p = example_parser("Doc.", "demo", quick_help="", sweep_noun="trials", workers_help="", threads=False, wandb=False,
                       workers_default=2)
    assert p.parse_args([]).workers == 2
    for option in ("--threads", "--no-wandb"):
        with pytest.raises(SystemExit):
            p.parse_args([option] + (["1"] if option == "--threads" else []))


def test_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert output_dir(None, "demo", True) == os.path.join("outputs", "demo_quick") and (tmp_path / "outputs").is_dir()
    assert output_dir(None, "demo", False) == os.path.join("outputs", "demo")
    assert output_dir(str(tmp_path / "own"), "demo", True) == str(tmp_path / "own")


def test_replot_draws_next_to_the_results_or_in_out(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"x": [1, 2]}))
    seen = []

    def draw(results, folder):
        seen.append((results, folder))
        return [os.path.join(folder, "fig.png")]

    assert replot(str(tmp_path / "results.json"), None, draw) == dict(figures=[str(tmp_path / "fig.png")], checks=[])
    assert replot(str(tmp_path / "results.json"), "elsewhere", draw)["figures"] == [os.path.join("elsewhere",
                                                                                                 "fig.png")]
    assert seen[0] == ({"x": [1, 2]}, str(tmp_path)) and "wrote" in capsys.readouterr().out


def test_start_prepares_the_process_and_the_folder(tmp_path, monkeypatch):
    import time

    import torch

    threads = torch.get_num_threads()
    monkeypatch.setattr("lightning_flat.experiments.training.quiet", lambda n: seen.append(n) or 1)
    seen = []
    args = example_parser("Doc.", "demo", quick_help="", sweep_noun="t", workers_help="").parse_args(
        ["--quick", "--threads", "3", "--out", str(tmp_path / "run")])
    before = time.perf_counter()
    out, t0 = start(args, "demo")
    assert out == str(tmp_path / "run") and (tmp_path / "run").is_dir() and before <= t0 <= time.perf_counter()
    assert seen == [3] and torch.get_num_threads() == threads  # quiet() gets the run's threads
