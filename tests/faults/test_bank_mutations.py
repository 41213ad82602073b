"""A saved bank mutated field by field, its manifest re-hashed to match: every mutation that makes it another
bank than its index says is refused at load with a FeatureFlowError, never loaded as something else.

(The manifest's SHA-256 sums catch any edit made without re-hashing: `faults/test_files.py` and
`saes/test_bank.py`.) Not refused, by design: a consistent change of an SAE's own settings in its cfg.json
(`dtype`, `normalize_activations`): SAELens reads the folder as the SAE those settings describe.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tl_featureflow as ff
from tl_featureflow._files import file_sha256
from tl_featureflow.synthetic import planted_chain_bank


def _rehash(path: Path) -> None:
    index = json.loads((path / "bank.json").read_text())
    for name in index["files"]:
        index["files"][name] = {"sha256": file_sha256(path / name), "size": (path / name).stat().st_size}
    (path / "bank.json").write_text(json.dumps(index))


def _json(name: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        data = json.loads((path / name).read_text())
        edit(data)
        (path / name).write_text(json.dumps(data))
    return mutate


def _weights(folder: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        tensors = load_file(path / folder / "sae_weights.safetensors")
        edit(tensors)
        save_file(tensors, path / folder / "sae_weights.safetensors")
    return mutate


def _entry(field: str, value: object) -> Callable[[Path], None]:
    return _json("bank.json", lambda index: index["saes"][0].__setitem__(field, value))


def _cfg(field: str, value: object) -> Callable[[Path], None]:
    return _json("res_0/cfg.json", lambda cfg: cfg.__setitem__(field, value))


MUTATIONS: dict[str, Callable[[Path], None]] = {
    "index d_model": _json("bank.json", lambda index: index.__setitem__("d_model", 32)),
    "index metadata not a mapping": _json("bank.json", lambda index: index.__setitem__("metadata", [1])),
    "index schema version": _json("bank.json", lambda index: index.__setitem__("schema_version", 99)),
    "index format": _json("bank.json", lambda index: index.__setitem__("format", "x")),
    "index without SAEs": _json("bank.json", lambda index: index.__setitem__("saes", [])),
    "index lists an SAE twice": _json("bank.json", lambda index: index["saes"].append(copy.deepcopy(index["saes"][0]))),
    "entry site unknown": _entry("site", "banana"),
    "entry site of another SAE": _entry("site", "mlp"),
    "entry layer of another SAE": _entry("layer", 3),
    "entry layer negative": _entry("layer", -1),
    "entry layer a string": _entry("layer", "0"),
    "entry d_sae": _entry("d_sae", 99),
    "entry architecture": _entry("architecture", "topk"),
    "entry folder of another SAE": _entry("folder", "res_1"),
    "entry folder outside the bank": _entry("folder", "../elsewhere"),
    "cfg d_in": _cfg("d_in", 32),
    "cfg d_sae": _cfg("d_sae", 6),
    "cfg architecture": _cfg("architecture", "jumprelu"),
    "cfg hook of another layer": _json("res_0/cfg.json", lambda cfg: cfg["metadata"].__setitem__(
        "hook_name", "blocks.2.hook_resid_post")),
    "cfg hook of another site": _json("res_0/cfg.json", lambda cfg: cfg["metadata"].__setitem__(
        "hook_name", "blocks.0.hook_mlp_out")),
    "weights W_dec shape": _weights("res_0", lambda t: t.__setitem__("W_dec", t["W_dec"][:, :32].contiguous())),
    "weights W_dec NaN": _weights("res_0", lambda t: t["W_dec"].__setitem__((0, 0), float("nan"))),
    "weights b_dec missing": _weights("res_0", lambda t: t.pop("b_dec")),
    "weights an extra tensor": _weights("res_0", lambda t: t.__setitem__("extra", torch.ones(3))),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    bank, _ = planted_chain_bank()
    return bank.save(tmp_path_factory.mktemp("bank") / "bank")


def test_the_unmutated_copy_loads(saved, tmp_path):
    copy_ = Path(shutil.copytree(saved, tmp_path / "bank"))
    _rehash(copy_)
    assert len(ff.SAEBank.load(copy_)) == 6


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_bank_mutated_field_by_field_does_not_load(saved, tmp_path, mutation):
    path = Path(shutil.copytree(saved, tmp_path / "bank"))
    MUTATIONS[mutation](path)
    _rehash(path)
    with pytest.raises(ff.FeatureFlowError):
        ff.SAEBank.load(path)
