"""Training presets: how many layers, how wide, how sparse, how many tokens.

Kept free of torch and SAELens so that the command line lists them instantly.

>>> PRESETS["quick"].describe()
'quick: 6 middle layers x res/mlp/att, d_sae 3 x d_model, BatchTopK k=32, 196,608 tokens'
>>> preset_layers(PRESETS["quick"], n_layers=30)
[12, 13, 14, 15, 16, 17]
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TRAINING_VERSION", "Preset", "PRESETS", "preset_layers"]

TRAINING_VERSION = 3  # bump when presets or the training recipe change what a bank means


@dataclass(frozen=True)
class Preset:
    """Training settings. Widths are multiples of ``d_model``; layers are chosen per model.

    ``n_layers=None`` means every layer; otherwise that many consecutive layers
    centred on the middle of the model.
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

    def describe(self) -> str:
        layers = "all layers" if self.n_layers is None else f"{self.n_layers} middle layers"
        return (f"{self.name}: {layers} x res/mlp/att, d_sae {self.expansion} x d_model, BatchTopK k={self.k:g}, "
                f"{self.training_tokens:,} tokens")


PRESETS: dict[str, Preset] = {
    # ~8 minutes on a 2-core CPU for SmolLM2 (layers 12-17, our training step): see docs/performance.md
    "quick": Preset("quick", n_layers=6, expansion=3, k=32, training_tokens=196_608, n_norm_batches=4,
                    n_checkpoints=3, eval_rows=128, loss_rows=8),
    # every layer and site at the quick preset's width and budget (issue 12's whole-depth bank):
    # measured in docs/performance.md (the goal: <= 25 minutes and <= 12 GB on this 2-core CPU)
    "deep": Preset("deep", n_layers=None, expansion=3, k=32, training_tokens=196_608, n_norm_batches=4,
                   n_checkpoints=3, eval_rows=64, loss_rows=4),
    # every layer and site: hours on a CPU, minutes on a GPU
    "full": Preset("full", n_layers=None, expansion=4, k=32, training_tokens=2_000_000),
    # seconds, for tests and trying the pipeline on a new model
    "tiny": Preset("tiny", n_layers=2, expansion=2, k=4, training_tokens=32_768, batch_tokens=128,
                   chunk_rows=16, context_size=32, n_checkpoints=2, dead_feature_window=20, n_norm_batches=4,
                   eval_rows=32, loss_rows=4),
    # about a minute for SmolLM2 on 2 CPU cores: a bank to smoke-test the pipeline (CI, notebooks);
    # its features are rough (few tokens, big batches), not for results
    "smoke": Preset("smoke", n_layers=2, expansion=2, k=8, training_tokens=16_384, batch_tokens=1024,
                    chunk_rows=32, context_size=64, n_checkpoints=1, dead_feature_window=8, n_norm_batches=2,
                    eval_rows=16, loss_rows=4),
}


def preset_layers(preset: Preset, n_layers: int) -> list[int]:
    """The layers a preset trains on a model of ``n_layers`` layers."""
    if preset.n_layers is None or preset.n_layers >= n_layers:
        return list(range(n_layers))
    start = max(0, n_layers // 2 - preset.n_layers // 2)
    return list(range(start, start + preset.n_layers))
