"""Training presets: how many layers, how wide, how sparse, how many tokens.

Kept free of torch and SAELens so that the command line lists them instantly.

>>> PRESETS["quick"].describe()
'quick: 6 middle layers x res/mlp/att, d_sae 3 x d_model, BatchTopK k=32, 393,216 tokens'
>>> preset_layers(PRESETS["quick"], n_layers=30)
[12, 13, 14, 15, 16, 17]
>>> table1_layers(30), preset_keys(PRESETS["paper"], n_layers=30)[:4]
([8, 15, 22], [('res', 7), ('res', 8), ('mlp', 8), ('att', 8)])
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TRAINING_VERSION", "Preset", "PRESETS", "preset_layers", "preset_keys", "table1_layers", "TABLE1_DEPTHS",
           "PRESET_COSTS", "preset_cost"]

#: Table 1 validates at about 1/4, 1/2 and 3/4 of the depth.
TABLE1_DEPTHS: tuple[float, ...] = (0.25, 0.5, 0.75)

TRAINING_VERSION = 5  # bump when presets or the training recipe change what a bank means (4: per-feature thresholds,
#                       quick budget; 5: the paper preset at k=16, the fidelity grid's winner)


@dataclass(frozen=True)
class Preset:
    """Training settings. Widths are multiples of ``d_model``; layers are chosen per model.

    ``n_layers=None`` means every layer; otherwise that many consecutive layers
    centred on the middle of the model. ``table1=True`` trains only what the paper's
    Table-1 protocol reads (:func:`preset_keys`): res at L-1 and L, mlp and att at L, for
    L at 1/4, 1/2 and 3/4 of the depth.
    """

    name: str
    n_layers: int | None
    expansion: int
    k: float
    training_tokens: int
    lr: float = 3e-3
    batch_tokens: int = 256
    chunk_rows: int = 64
    context_size: int = 128
    n_checkpoints: int = 4
    dead_feature_window: int = 50
    n_norm_batches: int = 10
    eval_rows: int = 256
    loss_rows: int = 16
    table1: bool = False
    calibration_tokens: int = 16_384   # per-feature thresholds (saes/thresholds.py); 0: SAELens's one threshold

    def describe(self) -> str:
        if self.table1:
            return (f"{self.name}: res(L-1), res(L), mlp(L), att(L) at 1/4, 1/2, 3/4 of the depth, "
                    f"d_sae {self.expansion} x d_model, BatchTopK k={self.k:g}, {self.training_tokens:,} tokens")
        layers = "all layers" if self.n_layers is None else f"{self.n_layers} middle layers"
        return (f"{self.name}: {layers} x res/mlp/att, d_sae {self.expansion} x d_model, BatchTopK k={self.k:g}, "
                f"{self.training_tokens:,} tokens")


PRESETS: dict[str, Preset] = {
    # the first `make demo`: as many tokens as our step trains in ~20 minutes on a 2-core CPU for SmolLM2
    # (layers 12-17, 18 SAEs; per-feature thresholds included): see docs/performance.md
    "quick": Preset("quick", n_layers=6, expansion=3, k=32, training_tokens=393_216, n_norm_batches=4,
                    n_checkpoints=3, eval_rows=128, loss_rows=8),
    # every layer and site at the quick preset's width and budget (issue 12's whole-depth bank):
    # measured in docs/performance.md (the goal: <= 25 minutes and <= 12 GB on this 2-core CPU)
    "deep": Preset("deep", n_layers=None, expansion=3, k=32, training_tokens=196_608, n_norm_batches=4,
                   n_checkpoints=3, eval_rows=64, loss_rows=4, calibration_tokens=8192),
    # what Table 1 reads (res L-1 and L, mlp and att L at 1/4, 1/2, 3/4 of the depth: 12 SAEs for SmolLM2), on
    # 8x the quick budget (the tokens curve in docs/results.md); checkpoints every 1/8 give the curve itself
    # k=16: the fidelity grid (docs/results.md) at layer 15 gave top-1 49.6% / exhaustive 67.2% against 37.5 / 52.6 at
    # k=32 (width 6 x and JumpReLU were worse), so L0 is the lever
    "paper": Preset("paper", n_layers=None, expansion=3, k=16, training_tokens=1_572_864, n_norm_batches=4,
                    n_checkpoints=7, eval_rows=128, loss_rows=8, table1=True),
    # every layer and site: hours on a CPU, minutes on a GPU
    "full": Preset("full", n_layers=None, expansion=4, k=32, training_tokens=2_000_000),
    # seconds, for tests and trying the pipeline on a new model
    "tiny": Preset("tiny", n_layers=2, expansion=2, k=4, training_tokens=32_768, batch_tokens=128,
                   chunk_rows=16, context_size=32, n_checkpoints=2, dead_feature_window=20, n_norm_batches=4,
                   eval_rows=32, loss_rows=4, calibration_tokens=2048),
    # about a minute for SmolLM2 on 2 CPU cores: a bank to smoke-test the pipeline (CI, notebooks);
    # its features are rough (few tokens, big batches), not for results
    "smoke": Preset("smoke", n_layers=2, expansion=2, k=8, training_tokens=16_384, batch_tokens=1024,
                    chunk_rows=32, context_size=64, n_checkpoints=1, dead_feature_window=8, n_norm_batches=2,
                    eval_rows=16, loss_rows=4, calibration_tokens=4096),
}


def table1_layers(n_layers: int) -> list[int]:
    """The layers L at about 1/4, 1/2 and 3/4 of a model's depth (Table 1's; L >= 1 so that L-1 exists)."""
    return sorted({min(n_layers - 1, max(1, round(f * n_layers))) for f in TABLE1_DEPTHS})


def preset_keys(preset: Preset, n_layers: int) -> list[tuple[str, int]]:
    """The ``(site, layer)`` SAEs a preset trains on a model of ``n_layers`` layers."""
    if preset.table1:
        keys = [key for layer in table1_layers(n_layers)
                for key in (("res", layer - 1), ("res", layer), ("mlp", layer), ("att", layer))]
        return list(dict.fromkeys(keys))
    return [(site, layer) for layer in preset_layers(preset, n_layers) for site in ("res", "mlp", "att")]


def preset_layers(preset: Preset, n_layers: int) -> list[int]:
    """The layers a preset trains on a model of ``n_layers`` layers (every layer with any SAE)."""
    if preset.table1:
        return sorted({layer for _, layer in preset_keys(preset, n_layers)})
    if preset.n_layers is None or preset.n_layers >= n_layers:
        return list(range(n_layers))
    start = max(0, n_layers // 2 - preset.n_layers // 2)
    return list(range(start, start + preset.n_layers))


#: What training each preset's bank for the embedded SmolLM2 costs on this project's 2-core CPU, as measured
#: (docs/performance.md, "Training SAE banks"); said before any training starts.
PRESET_COSTS: dict[str, str] = {
    "quick": "about 16 minutes on 2 CPU cores",
    "deep": "about 25 minutes on 2 CPU cores",
    "paper": "about 80 minutes on 2 CPU cores",
    "full": "several hours on 2 CPU cores",
    "smoke": "about a minute",
    "tiny": "seconds",
}


def preset_cost(name: str) -> str:
    """The measured cost of training ``name``'s embedded bank (``"a while"`` for a preset not measured).

    >>> preset_cost("quick")
    'about 16 minutes on 2 CPU cores'
    """
    return PRESET_COSTS.get(name, "a while")
