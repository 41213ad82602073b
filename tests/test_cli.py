import subprocess
import sys

from tl_featureflow.cli import build_parser, main


def test_help_is_fast_and_lists_the_demo():
    out = subprocess.run([sys.executable, "-m", "tl_featureflow.cli", "--help"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert "demo" in out.stdout
    # lazy imports: asking for help must not import torch
    probe = "import sys, tl_featureflow.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_python_dash_m_is_the_featureflow_command():
    """``python -m tl_featureflow`` (what ``torchrun -m tl_featureflow`` runs) is the CLI: same help, same exit codes."""
    out = subprocess.run([sys.executable, "-m", "tl_featureflow", "--help"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.startswith("usage: featureflow") and "validate" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "tl_featureflow", "map", "--k", "x"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "--k" in bad.stderr


def test_demo_arguments_parse():
    args = build_parser().parse_args(["demo", "--max-new-tokens", "3", "--device", "cpu"])
    assert args.max_new_tokens == 3 and args.device == "cpu"


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: featureflow" in capsys.readouterr().out


def test_train_saes_arguments_parse():
    args = build_parser().parse_args(["train-saes", "--preset", "tiny", "--layers", "1", "2", "--sites", "res",
                                      "--out", "x"])
    assert (args.preset, args.layers, args.sites, args.out, args.trainer) == ("tiny", [1, 2], ["res"], "x", "fast")
    assert build_parser().parse_args(["train-saes", "--trainer", "saelens"]).trainer == "saelens"
    import pytest

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-saes", "--sites", "resid"])


def _cache_banks(tmp_path, monkeypatch, tokens_by_preset):
    import json

    from tl_featureflow import embedded

    monkeypatch.setattr(embedded, "embedded_bank_dir", lambda preset="quick": tmp_path / preset)
    for preset, tokens in tokens_by_preset.items():
        (tmp_path / preset / "bank").mkdir(parents=True, exist_ok=True)
        (tmp_path / preset / "bank" / "bank.json").write_text(json.dumps({"metadata": {"training_tokens": tokens}}))


def test_the_best_cached_bank_has_the_most_tokens(tmp_path, monkeypatch):
    import pytest

    import tl_featureflow as ff
    from tl_featureflow.embedded import best_cached_preset

    _cache_banks(tmp_path, monkeypatch, {})
    assert best_cached_preset() == "quick"                        # nothing cached: quick, trained on first use
    _cache_banks(tmp_path, monkeypatch, {"quick": 589_824, "deep": 196_608})
    assert best_cached_preset() == "quick"
    _cache_banks(tmp_path, monkeypatch, {"deep": 589_824})
    assert best_cached_preset() == "deep"                         # equal tokens: the earlier candidate (more layers)
    _cache_banks(tmp_path, monkeypatch, {"paper": 1_572_864})
    assert best_cached_preset() == "deep"                         # the paper bank has no flow across layers
    assert best_cached_preset(("full", "paper", "deep", "quick")) == "paper"
    with pytest.raises(ff.InvalidArgumentError, match="nope"):
        best_cached_preset(("nope",))


def test_commands_without_a_preset_load_the_best_cached_bank(tmp_path, monkeypatch):
    from tl_featureflow import cli, embedded

    _cache_banks(tmp_path, monkeypatch, {"quick": 589_824, "paper": 1_572_864})
    loaded = []
    monkeypatch.setattr(embedded, "load_embedded_bank", lambda preset, **kw: loaded.append(preset))
    for argv in (["demo"], ["validate", "--paper"], ["demo", "--preset", "deep"]):
        cli._load_bank(build_parser().parse_args(argv), model=None)
    assert loaded == ["quick", "paper", "deep"]


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from tl_featureflow import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in commands.items()
              for a in sub._actions if not a.help and not isinstance(a, argparse._HelpAction)]
    assert silent == []
    assert "--preset tiny" not in commands["demo"].format_help()      # tiny is for test models only
