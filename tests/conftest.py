"""Shared fixtures: tiny seeded models and SAEs, the CLI on tiny assets, and the no-hooks-left-behind guard.

The plain builders behind them (``tiny_cfg``, ``make_sae``, ``make_bank``, ``byte_tokenizer``) live in
:mod:`tl_featureflow.synthetic`; tests import those from there, never from this file."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import pytest
import torch
from sae_lens import SAE
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.synthetic import D_VOCAB, byte_tokenizer, make_bank, make_sae, tiny_cfg

# ---------------------------------------------------------------------------- hook guard
_HOOKED: weakref.WeakSet[HookPoint] = weakref.WeakSet()
_original_add_hook = HookPoint.add_hook


def _recording_add_hook(self: HookPoint, *args, **kwargs):  # type: ignore[no-untyped-def]
    _HOOKED.add(self)
    return _original_add_hook(self, *args, **kwargs)


HookPoint.add_hook = _recording_add_hook  # type: ignore[method-assign]


def _leftover_hooks() -> list[str]:
    """Hook points that still hold non-permanent hooks added since the last reset."""
    left = []
    for point in list(_HOOKED):
        n = sum(not h.is_permanent for h in [*point.fwd_hooks, *point.bwd_hooks])
        if n:
            left.append(f"{point.name if point.name else repr(point)}: {n} hook(s)")
    return left


@pytest.fixture(autouse=True)
def no_hooks_left_behind():
    """Fail any test that leaves a (non-permanent) hook on a model."""
    _HOOKED.clear()
    yield
    left = _leftover_hooks()
    for point in list(_HOOKED):
        point.remove_hooks("both")
    _HOOKED.clear()
    if left:
        pytest.fail(f"hooks left on a model after the test: {left}")


@pytest.fixture(scope="session")
def leftover_hooks() -> Callable[[], list[str]]:
    """``leftover_hooks()``: the hook points that still hold non-permanent hooks added during this test."""
    return _leftover_hooks


# ---------------------------------------------------------------------------- tiny models
@pytest.fixture
def tiny_model() -> HookedTransformer:
    torch.manual_seed(0)
    return HookedTransformer(tiny_cfg()).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- tiny SAEs
@pytest.fixture(scope="session")
def sae_factory() -> Callable[..., SAE]:
    """:func:`tl_featureflow.synthetic.make_sae`: a seeded SAE with random weights."""
    return make_sae


@pytest.fixture(scope="session")
def bank_factory() -> Callable[..., SAEBank]:
    """:func:`tl_featureflow.synthetic.make_bank`: a bank of seeded SAEs (3 layers x 3 sites by default)."""
    return make_bank


# ---------------------------------------------------------------------------- a tiny model that reads text
@pytest.fixture(scope="session")
def text_model_factory(tmp_path_factory):
    """``factory()`` -> a fresh tiny FlowTransformer with a byte tokenizer (3 layers, d_model 32)."""
    from tl_featureflow.model import FlowTransformer

    tokenizer = byte_tokenizer(tmp_path_factory.mktemp("byte-tokenizer"))

    def factory():
        torch.manual_seed(0)
        return FlowTransformer(tiny_cfg(d_vocab=len(tokenizer), n_ctx=256), tokenizer=tokenizer).eval()

    return factory


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path, text_model_factory):
    """The CLI on tiny assets: a byte-level tiny model, a random JumpReLU bank (``--bank`` args returned)."""
    from tl_featureflow import cli

    model = text_model_factory()
    bank_dir = make_bank(arch="jumprelu", d_sae=64).save(tmp_path / "bank")
    texts = torch.cat([torch.full((3, 1), model.tokenizer.bos_token_id),
                       torch.randint(0, 256, (3, 23), generator=torch.Generator().manual_seed(0))], dim=1)
    monkeypatch.setattr(cli, "_load_model", lambda args: model)
    monkeypatch.setattr(cli, "_heldout_tokens", lambda model, n: texts[:n])
    monkeypatch.chdir(tmp_path)
    return ["--bank", str(bank_dir)]


def _run_cli(argv, capsys):
    from tl_featureflow import cli

    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., tuple[int, str, str]]:
    """``run_cli(argv, capsys)``: run `featureflow ARGV` in-process: (exit code, stdout, stderr)."""
    return _run_cli
