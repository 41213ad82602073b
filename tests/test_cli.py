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
