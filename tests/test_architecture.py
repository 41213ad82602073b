"""The architecture in the tree: wings, imports that point down, no circles, a small __init__."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import tl_featureflow

PACKAGE = Path(tl_featureflow.__file__).parent

# Lower rank = lower layer; a module may import modules of its own or a lower rank only.
RANKS = {
    "errors": 0, "checks": 0, "refs": 0, "_files": 0, "_compat": 0, "_lazy": 0, "distributed": 0,
    "saes": 1, "fastpath": 1, "backend": 1, "model": 2, "synthetic": 2, "embedded": 3, "rundir": 3,
    "flow": 4, "steer": 5, "causal": 5, "viz": 7, "cli": 8, "demo": 8, "__init__": 9, "__main__": 9,
}
# Sibling wings that must not import each other (steer and causal are both built on flow).
FORBIDDEN = {("steer", "causal"), ("causal", "steer")}
# The thin, lazy entry points that may point up, each documented where it lives.
ALLOWED_UP = {("flow.tracer", "causal.experiment")}   # FlowTracer.validate -> causal.experiment.validate


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py" or p.parent == PACKAGE}


def _imports(path: Path) -> set[str]:
    """tl_featureflow modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tl_featureflow"):
            base = node.module.removeprefix("tl_featureflow").lstrip(".")
            for alias in node.names:
                full = f"{base}.{alias.name}".lstrip(".")
                found.add(full if full in _modules() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("tl_featureflow.") for a in node.names if a.name.startswith("tl_featureflow.")}
    return {m for m in found if m and m in _modules()}


def _wing(module: str) -> str:
    return module.split(".")[0]


GRAPH = {name: _imports(path) - {name} for name, path in _modules().items()}


def test_the_tree_shows_the_wings():
    wings = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert wings == {"saes", "flow", "causal", "steer", "viz"}
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.name != "__main__.py")   # `python -m`'s shim
    assert len(top) <= 16, f"top-level modules should stay few, got {top}"
    assert len((PACKAGE / "__init__.py").read_text().splitlines()) < 200


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    rank = RANKS[_wing(module)]
    for target in GRAPH[module]:
        if (module, target) in ALLOWED_UP or _wing(target) == _wing(module):
            continue
        assert (_wing(module), _wing(target)) not in FORBIDDEN, f"{module} imports {target}"
        assert RANKS[_wing(target)] <= rank, f"{module} (rank {rank}) imports {target}, a higher wing"


def test_no_import_cycles():
    graph = {m: {t for t in targets if (m, t) not in ALLOWED_UP} for m, targets in GRAPH.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, nxt])}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_viz_takes_result_objects_only():
    for module in ("viz.plot", "viz.html"):
        assert not GRAPH[module] & {"flow.tracer", "model", "embedded", "causal.experiment", "steer.steerer"}, module


def test_matching_methods_are_registered_in_one_place_and_validation_never_branches_on_their_names():
    """Issue 23: flow/methods.py is the one home of matching methods; validation dispatches on what a method
    needs (a toy method registered elsewhere validates: tests/flow/test_methods.py)."""
    defining = {name for name, path in _modules().items() if "MatchingMethod(" in path.read_text()}
    assert defining == {"flow.methods"}
    tree = ast.parse((PACKAGE / "causal" / "experiment.py").read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    literals = {node.value for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}
    assert not literals & {"top5", "random", "permutation", "exhaustive", "exhaustive_single"}


def test_the_run_folder_layout_lives_in_rundir_only():
    """Issue 23: the demo, the CLI and the report name run-folder files through RunDir, never as literals."""
    names = {"run.json", "cards.json", "validation.json", "graphs", "report_cards", "table1.md", "report.html"}
    for module in ("demo", "cli", "viz.html"):
        tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & names, f"{module} spells {literals & names}"


def test_the_tracer_only_matches_and_traces():
    """Issue 23: labels (top contexts, logit lens) live in flow.labels and the flow map's files in flow.flowmap;
    the tracer imports no I/O module and computes nothing on attribute access."""
    assert not GRAPH["flow.tracer"] & {"_files", "flow.contexts", "saes.corpus", "embedded"}
    tracer_source = (PACKAGE / "flow" / "tracer.py").read_text()
    assert "@property" not in tracer_source and "def logit_lens" not in tracer_source


#: The public API (issue 23): the architecture's contract names and what a user needs daily; the rest is reached
#: through the wings' namespaces. Changing this list is an API change: update docs/guide.md with it.
PUBLIC_API = [
    "__version__",
    "FeatureFlowError", "InvalidArgumentError", "UnknownFeatureError", "CacheError",
    "Site", "FeatureRef", "hook_name",
    "FlowTransformer", "load_embedded_model", "load_embedded_bank",
    "SAEBank", "train_bank",
    "FlowTracer", "Matching", "Predecessors", "FlowGraph", "FlowMap", "feature_contexts",
    "validate", "ValidationReport",
    "Steerer", "steering_sweep", "SteeringSweep", "steering_report_card",
    "plot", "errors", "saes", "flow", "causal", "steer", "viz", "model", "embedded",
]


def test_the_public_api_is_a_short_tested_list_and_the_wings_are_namespaces():
    assert tl_featureflow.__all__ == PUBLIC_API
    assert len([n for n in PUBLIC_API if n[0] != "_" and n not in tl_featureflow._SUBMODULES]) <= 25
    assert tl_featureflow.flow.methods.register is importlib.import_module("tl_featureflow.flow.methods").register
    assert "cards" in dir(tl_featureflow.flow) and "steerer" in dir(tl_featureflow.steer)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tl_featureflow.flow.nope  # noqa: B018


# ---------------------------------------------------------------------------- the model seam (backend.py)
# The modules that may reach a TransformerLens model's internals directly: the seam itself, the model and
# its fast path, and the one seam for private APIs.
MODEL_INSIDE = {"backend", "model", "fastpath", "_compat"}
_MODEL_CALLS = {"run_with_hooks", "run_with_cache", "generate", "to_tokens"}
_LAYER_KEYWORDS = {"stop_at_layer", "start_at_layer"}


def _is_backend(node: ast.AST) -> bool:
    """``backend``, ``self.backend`` or ``backend_of(...)``: a call on these goes through the seam."""
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and node.func.id == "backend_of"
    if isinstance(node, ast.Attribute):
        return "backend" in node.attr
    return isinstance(node, ast.Name) and "backend" in node.id


def _model_reaches(path: Path) -> list[str]:
    """Where a module reaches the model's internals: ``.blocks[``, ``.W_U``, ``.ln_final``, a forward with
    ``stop_at_layer=``/``start_at_layer=``, or ``.run_with_hooks/.run_with_cache/.generate/.to_tokens(`` and
    ``.hooks(fwd_hooks=`` on anything that is not a backend."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "blocks":
            found.append(f"{where} .blocks[")
        elif isinstance(node, ast.Attribute) and node.attr in {"W_U", "ln_final"}:
            found.append(f"{where} .{node.attr}")
        elif isinstance(node, ast.Call):
            receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
            if receiver is not None and _is_backend(receiver):
                continue
            keywords = {k.arg for k in node.keywords}
            if keywords & _LAYER_KEYWORDS:
                found.append(f"{where} {sorted(keywords & _LAYER_KEYWORDS)}")
            elif isinstance(node.func, ast.Attribute) and (
                    node.func.attr in _MODEL_CALLS or (node.func.attr == "hooks" and "fwd_hooks" in keywords)):
                found.append(f"{where} .{node.func.attr}(")
    return found


def test_the_wings_reach_the_model_through_the_backend():
    reaching = {name: hits for name, path in _modules().items()
                if name not in MODEL_INSIDE and (hits := _model_reaches(path))}
    assert reaching == {}, "reach the model through tl_featureflow.backend (backend_of(model).…)"


def _bare_raises(path: Path) -> list[int]:
    """Lines that raise the base ``FeatureFlowError`` itself (a subclass says what kind of failure it is)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
            and isinstance(node.exc.func, ast.Name) and node.exc.func.id == "FeatureFlowError"]


def test_raises_use_a_specific_error_class(tmp_path):
    bare = {name: lines for name, path in _modules().items() if (lines := _bare_raises(path))}
    assert bare == {}, "raise the subclass that fits (errors.py: InvalidArgumentError, StateError, BankError, ...)"
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    raise FeatureFlowError('x')\n")
    assert _bare_raises(planted) == [2]


def test_state_errors_say_what_to_call_first():
    from tl_featureflow.errors import StateError
    from tl_featureflow.steer.judge import OfflineJudge

    with pytest.raises(StateError, match="calibrate"):
        OfflineJudge().behavioural(["a"])
    assert issubclass(StateError, RuntimeError) and issubclass(StateError, tl_featureflow.FeatureFlowError)
