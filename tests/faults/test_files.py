"""Files under faults: kills between the renames of a save, symlinked folders, debris of dead writers,
NaN written into an SAE, graphs mutated field by field (issue 24 #8, #9, #11, #12, #14)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.synthetic import planted_chain_bank

# A child that saves the planted bank (scaled by 2) to argv[1] and is SIGKILLed at the n-th os.replace.
KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys, torch
    from tl_featureflow.synthetic import planted_chain_bank
    bank, _ = planted_chain_bank()
    for sae in bank.values():
        with torch.no_grad():
            sae.W_dec.mul_(2)
    real, calls = os.replace, []
    def replace(src, dst):
        calls.append(dst)
        if len(calls) == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.replace = replace
    bank.save(sys.argv[1])
""")


def _same(a, b) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k].W_dec, b[k].W_dec) for k in a)


def _killed_save(path, at: int) -> int:
    return subprocess.run([sys.executable, "-c", KILLED_SAVE, str(path), str(at)], capture_output=True).returncode


def test_a_save_killed_between_its_two_renames_leaves_a_bank_that_loads(tmp_path):
    """#11: the old bank was only under .bank.*.old; now load (and the next save) puts it back."""
    bank, _ = planted_chain_bank()
    path = tmp_path / "bank"
    bank.save(path)
    # os.replace calls of a save over a bank: manifest file (1), final -> .old (2), tmp -> final (3)
    assert _killed_save(path, 3) == -9
    assert not path.exists() and list(tmp_path.glob(".bank.*.old"))
    assert _same(ff.SAEBank.load(path), bank)                    # the old bank, back in place
    assert not list(tmp_path.glob(".bank.*.old"))
    assert not list(tmp_path.glob(".bank.*.tmp"))                # the dead writer's half-built folder, cleaned (#14)
    bank.save(path)
    assert not list(tmp_path.glob(".bank.*")) and _same(ff.SAEBank.load(path), bank)


def test_a_save_killed_before_the_swap_keeps_the_old_bank(tmp_path):
    bank, _ = planted_chain_bank()
    path = tmp_path / "bank"
    bank.save(path)
    assert _killed_save(path, 2) == -9
    assert _same(ff.SAEBank.load(path), bank)


def test_saving_onto_a_symlinked_bank_replaces_the_target_and_keeps_the_link(tmp_path):
    """#12: the link was replaced by a folder and its target kept the old bank."""
    bank, _ = planted_chain_bank()
    target, link = tmp_path / "real-bank", tmp_path / "bank"
    bank.save(target)
    link.symlink_to(target)
    scaled, _ = planted_chain_bank()
    with torch.no_grad():
        for sae in scaled.values():
            sae.W_dec.mul_(3)
    scaled.save(link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _same(ff.SAEBank.load(target), scaled) and _same(ff.SAEBank.load(link), scaled)


def test_debris_of_a_live_writer_is_left_alone(tmp_path):
    bank, _ = planted_chain_bank()
    live = tmp_path / f".bank.{__import__('os').getpid()}.abc.tmp"     # this process is alive
    live.mkdir()
    bank.save(tmp_path / "bank")
    assert live.is_dir()


def test_a_nan_written_in_place_is_refused_at_save(tmp_path):
    """#9: it saved fine and then could not be loaded."""
    bank, _ = planted_chain_bank()
    with torch.no_grad():
        bank["res", 2].W_enc[0, 0] = math.nan
    with pytest.raises(ff.errors.BankError, match=r"\('res', 2\).*W_enc"):
        bank.save(tmp_path / "bank")
    assert not (tmp_path / "bank").exists()


def _graph_dict():
    bank, truth = planted_chain_bank()
    return ff.FlowTracer(bank).trace(truth.chain[2], t_res=0.25, t_module=0.15).to_dict()


MUTATIONS = {
    "role banana": lambda d: d["nodes"][0].update(role="banana"),
    "span reversed": lambda d: d.update(span=[3, 0]),
    "edge to a missing node": lambda d: d["edges"][0].update(dst="3/res/999"),
    "edge from a missing node": lambda d: d["edges"][0].update(src="0/mlp/999"),
    "edge score nan": lambda d: d["edges"][0].update(score=float("nan")),
    "seed not a node": lambda d: d.update(seed="3/res/999"),
    "node twice": lambda d: d["nodes"].append(dict(d["nodes"][0])),
    "direction banana": lambda d: d.update(direction="banana"),
    "t_res infinite": lambda d: d.update(t_res=float("inf")),
    "span of one": lambda d: d.update(span=[1]),
    "no nodes": lambda d: d.update(nodes=[]),
    "bad ref": lambda d: d["nodes"][0].update(ref="1-res-2"),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_mutated_graph_does_not_load(mutation):
    """#8: role "banana", span [3, 0] and an edge to a node not in the graph loaded."""
    data = _graph_dict()
    assert ff.FlowGraph.from_dict(data).seed                   # the unmutated graph loads
    MUTATIONS[mutation](data)
    with pytest.raises(ff.CacheError, match="flow graph"):
        ff.FlowGraph.from_dict(data)


def test_a_read_only_cache_serves_the_contexts_it_holds(tmp_path, monkeypatch):
    """#17: PermissionError creating the .lock, and tracer labels failed, although the answer was cached."""
    import contextlib
    import os
    import warnings

    from tl_featureflow.flow import contexts
    from tl_featureflow.synthetic import tiny_model

    monkeypatch.setenv("TL_FEATUREFLOW_CACHE", str(tmp_path / "cache"))
    model, (bank, _) = tiny_model(), planted_chain_bank()
    tokens = torch.randint(1, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    first = contexts.feature_contexts(model, bank, tokens, progress=False)
    cache = tmp_path / "cache"
    if os.geteuid() == 0:       # root writes anywhere: make the lock fail as it does for a user in a read-only folder
        @contextlib.contextmanager
        def read_only(entry):
            raise PermissionError(13, "Permission denied", str(entry))
            yield
        monkeypatch.setattr(contexts, "entry_lock", read_only)
    else:
        for folder in [cache, *cache.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o555)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")                     # served from the cache: no warning
            again = contexts.feature_contexts(model, bank, tokens, progress=False)
        assert torch.equal(again.values["res", 2], first.values["res", 2])
        with pytest.warns(UserWarning, match="read-only"):     # not cached: computed, not stored
            other = contexts.feature_contexts(model, bank, tokens[:2], progress=False)
        assert other.n_tokens < first.n_tokens
    finally:
        for folder in [cache, *cache.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o755)


# A child that saves the planted bank to argv[1] with files capped at argv[2] bytes (RLIMIT_FSIZE, the
# signal ignored so a write past it fails with EFBIG as on a full disk) and prints what it raised.
CAPPED_SAVE = textwrap.dedent("""
    import resource, signal, sys
    from tl_featureflow.synthetic import planted_chain_bank
    bank, _ = planted_chain_bank()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    try:
        bank.save(sys.argv[1])
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE semantics are Linux's")
def test_a_save_onto_a_full_disk_raises_a_cache_error_naming_the_folder_and_keeps_the_old_bank(tmp_path):
    """#16: a write that runs out of room is a CacheError naming the path, not safetensors' own error."""
    bank, _ = planted_chain_bank()
    path = tmp_path / "bank"
    bank.save(path)
    out = subprocess.run([sys.executable, "-c", CAPPED_SAVE, str(path), "1000"], capture_output=True, text=True)
    assert out.stdout.startswith("CacheError"), out.stdout + out.stderr
    assert str(path) in out.stdout and "disk full" in out.stdout
    assert _same(ff.SAEBank.load(path), bank)                    # the old bank is untouched
    assert not list(tmp_path.glob(".bank.*.tmp"))                # and nothing half-written is left


def test_a_flow_map_into_a_read_only_folder_raises_a_cache_error_naming_it(tmp_path, monkeypatch):
    """#16: a write refused for want of rights names the path (root ignores chmod, so the refusal is planted)."""
    import tl_featureflow._files as files

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(ff.CacheError, match="could not write .*flow.json.*read-only"):
        files.atomic_write_text(tmp_path / "flow.json", "{}")
