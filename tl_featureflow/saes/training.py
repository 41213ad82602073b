"""SAE banks trained here with SAELens, for the embedded model or any HookedTransformer.

One model forward pass feeds every SAE: SAELens's ``MultiSAETrainer`` (optimisers,
losses, learning-rate schedule, dead-feature tracking, per-SAE checkpoints) is driven
by a deterministic activation stream of ours. The stream is a pure function of the
corpus, the seed and the step, so an interrupted run resumes from its last complete
checkpoint and ends with the same SAEs as an uninterrupted run.

SAEs are trained as BatchTopK (a fixed average number ``k`` of active features per
token: sparsity is set directly instead of tuned through an L1 coefficient) and saved
by SAELens as **JumpReLU** SAEs. SAELens's conversion gives every feature the same
threshold; we then calibrate one threshold per feature
(:func:`~tl_featureflow.saes.thresholds.calibrate_bank`, at each SAE's own L0), so folding,
threshold-scaled steering and "fell below its threshold" mean something per feature.

>>> bank = train_bank(model, preset="quick", out="banks/smollm2-quick")   # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow import _compat
from tl_featureflow._files import atomic_write_json, clean_debris, exclusive_lock, scratch_directory, tensor_digest
from tl_featureflow.checks import check_int
from tl_featureflow.errors import CacheError, InvalidArgumentError, ModelMismatchError
from tl_featureflow.refs import SITES, Key, Site, block_of, check_layer, hook_name
from tl_featureflow.saes import fast_step
from tl_featureflow.saes.bank import SAEBank
from tl_featureflow.saes.presets import PRESETS, TRAINING_VERSION, Preset, preset_keys, preset_layers
from tl_featureflow.saes.stream import ActivationStream

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["TRAINING_VERSION", "Preset", "PRESETS", "preset_layers", "ActivationStream", "train_bank", "checkpoints",
           "load_checkpoint_bank"]

_COMPLETE = "complete.json"

def _check_request(model: HookedTransformer, sites: Sequence[str], layers: Sequence[int] | None,
                   preset: Preset) -> list[Key]:
    """The ``(site, layer)`` keys to train: the preset's (``layers=None``) or every site x layer asked for."""
    bad_sites = [s for s in sites if s not in SITES]
    if bad_sites or not sites:
        raise InvalidArgumentError(f"unknown sites {bad_sites or list(sites)}: expected some of {SITES}")
    if layers is None:
        keys = [key for key in preset_keys(preset, model.cfg.n_layers) if key[0] in sites]
        if not keys:
            raise InvalidArgumentError(f"the {preset.name} preset trains no SAE at sites {list(sites)}")
        return keys  # type: ignore[return-value]
    layers = [check_layer(layer) for layer in layers]
    too_deep = [layer for layer in layers if layer >= model.cfg.n_layers]
    if too_deep or not layers:
        raise ModelMismatchError(
            f"layers {too_deep or layers} are not layers of the model, which has {model.cfg.n_layers} (0-{model.cfg.n_layers - 1})"
        )
    return [(site, layer) for layer in sorted(set(layers)) for site in SITES if site in sites]


def _latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint with a completion mark; partial ones are deleted."""
    if not folder.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in folder.iterdir():
        mark = path / _COMPLETE
        if not mark.is_file():
            shutil.rmtree(path, ignore_errors=True)  # a crash mid-write: never resumed from
            continue
        steps = json.loads(mark.read_text())["steps_done"]
        if best is None or steps > best[0]:
            best = (steps, path)
    return best[1] if best else None


def train_bank(
    model: HookedTransformer,
    *,
    sites: Sequence[Site] = SITES,
    layers: Sequence[int] | None = None,
    preset: str | Preset = "quick",
    out: str | Path,
    tokens: Int[Tensor, "n_rows ctx"] | None = None,
    eval_tokens: Int[Tensor, "n_rows ctx"] | None = None,
    training_tokens: int | None = None,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    trainer: Literal["fast", "saelens"] = "fast",
    progress: bool = True,
) -> SAEBank:
    """Train one SAE per ``(site, layer)`` with SAELens and return them as an :class:`SAEBank`.

    Args:
        model: a HookedTransformer (the embedded SmolLM2 or any other).
        sites, layers: what to train (default layers: the preset's choice for this model).
        preset: a name in :data:`PRESETS` (``"quick"``, ``"paper"``, ``"deep"``, ``"full"``, ``"tiny"``,
            ``"smoke"``) or a :class:`Preset`.
        out: the run folder. Checkpoints go to ``out/checkpoints`` (resumed from when
            present), the bank to ``out/bank``. A folder holding another run is refused.
        tokens: ``[n_rows, ctx]`` training rows (default: the offline corpus's train split).
        eval_tokens: held-out rows for the quality report (default: the corpus's held-out
            split when ``tokens`` is not given; no report when neither is available).
        training_tokens: overrides the preset's token budget.
        trainer: ``"fast"`` (default): SAELens's trainer (its Adam, schedule, checkpoints
            and dead-feature statistics) with our sparse BatchTopK step
            (:mod:`tl_featureflow.saes.fast_step`, same loss and gradients, ~3x faster);
            ``"saelens"``: SAELens's own step.

    Returns the bank, also saved (atomically) to ``out/bank``; its metadata records the
    model, corpus hash, preset, tokens and library versions.
    """
    if trainer not in ("fast", "saelens"):
        raise InvalidArgumentError(f"unknown trainer {trainer!r}: expected 'fast' or 'saelens'")
    check_int(seed, "seed")
    if training_tokens is not None:
        check_int(training_tokens, "training_tokens", low=1)
    preset = _resolve_preset(preset, training_tokens)
    keys = _check_request(model, sites, layers, preset)
    tokens, eval_tokens, corpus_meta = _training_rows(model, preset, tokens, eval_tokens, progress)
    names = {f"{site}_{layer}": (site, layer) for site, layer in keys}
    hooks = {name: hook_name(*key) for name, key in names.items()}
    run = {
        "model": getattr(model.cfg, "model_name", "unknown"), "d_model": model.cfg.d_model,
        "n_layers": model.cfg.n_layers, "preset": asdict(preset), "keys": [list(k) for k in keys], "seed": seed,
        "corpus": corpus_meta, "trainer": trainer,
    }
    # checked before anything is written: a corpus too small for one chunk or batch
    stream = ActivationStream(model, tokens, list(dict.fromkeys(hooks.values())), batch_tokens=preset.batch_tokens,
                              chunk_rows=preset.chunk_rows, seed=seed, last_block=block_of(max(layer for _, layer in keys)))
    out = Path(out)
    # one training per run folder: a second one into the same folder is refused, not run beside it (issue 24 #13)
    with exclusive_lock(out.parent / f".{out.name}.training.lock", f"a training into {out}"):
        _claim_run_folder(out, run)
        device = str(next(model.parameters()).device)
        saes = _new_training_saes(hooks, model.cfg.d_model, preset, device, seed, run["model"])
        trained, elapsed = _fit(saes, hooks, stream, preset, model.cfg.d_model, out / "checkpoints", device, progress,
                                trainer)
        inference = _to_inference(trained, names, out, device)
        # the training SAEs, their trainers' Adam states (a reference cycle through our step) and the stream's last
        # chunk: gigabytes for `deep`, not needed by calibration and the quality report
        del saes, trained, stream
        gc.collect()
        inference, thresholds = _per_feature_thresholds(model, inference, tokens, preset, seed, progress)
        quality = _quality(model, inference, eval_tokens, preset, out, progress)
        bank = SAEBank(inference, metadata={**thresholds,
            **(metadata or {}), "model": run["model"], "corpus": corpus_meta, "preset": preset.name,
            "training_version": TRAINING_VERSION, "preset_settings": asdict(preset), "training_tokens": preset.training_tokens, "seed": seed,
            "train_seconds_last_session": round(elapsed, 1), "trainer": trainer, **_versions(), "quality": quality,
        })
        bank.save(out / "bank")
    return bank


def checkpoints(out: str | Path) -> dict[int, Path]:
    """A run folder's complete checkpoints by tokens seen (SAELens names each by its sample count)."""
    folder = Path(out) / "checkpoints"
    found = {int(path.name): path for path in folder.iterdir()
             if (path / _COMPLETE).is_file() and path.name.isdigit()} if folder.is_dir() else {}
    return dict(sorted(found.items()))


def load_checkpoint_bank(checkpoint: str | Path, *, keys: Sequence[Key] | None = None,
                         device: str = "cpu") -> SAEBank:
    """The bank a run would have ended with at one of its checkpoints (SAELens's conversion, one threshold per SAE).

    Each training SAE is loaded, its activation scaling folded in and converted to JumpReLU
    the way :func:`train_bank` converts the final SAEs. With ``keys`` only those SAEs.
    Metadata: ``training_tokens`` (the tokens seen) and ``checkpoint``.
    """
    from sae_lens.saes.sae import TrainingSAE

    checkpoint = Path(checkpoint)
    folders = {(site, int(layer)): path for path in sorted(checkpoint.iterdir()) if (path / "cfg.json").is_file()
               for site, layer in [path.name.split("_")]}
    wanted = list(folders) if keys is None else list(keys)
    missing = [key for key in wanted if key not in folders]
    if not folders or missing:
        raise CacheError(f"checkpoint {checkpoint} holds SAEs {sorted(folders)}: expected {missing or 'some'}")
    trained: dict[str, Any] = {}
    for key in wanted:
        sae = TrainingSAE.load_from_disk(folders[key], device=device)
        scaler = folders[key] / "activation_scaler.json"
        factor = json.loads(scaler.read_text()).get("scaling_factor") if scaler.is_file() else None
        if factor is not None:
            sae.fold_activation_norm_scaling_factor(factor)
        trained[folders[key].name] = sae
    saes = _to_inference(trained, {folders[key].name: key for key in wanted}, None, device)
    return SAEBank(saes, metadata={"training_tokens": int(checkpoint.name) if checkpoint.name.isdigit() else None,
                                   "checkpoint": str(checkpoint)})


# -- the steps of train_bank ---------------------------------------------------------------------------
def _resolve_preset(preset: str | Preset, training_tokens: int | None) -> Preset:
    resolved = PRESETS[preset] if isinstance(preset, str) and preset in PRESETS else preset
    if not isinstance(resolved, Preset):
        raise InvalidArgumentError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)} or a Preset")
    return resolved if training_tokens is None else replace(resolved, training_tokens=int(training_tokens))


def _training_rows(model: HookedTransformer, preset: Preset, tokens: Tensor | None, eval_tokens: Tensor | None,
                   progress: bool) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """Training rows, held-out rows and the corpus's identity (the offline corpus unless given)."""
    if tokens is not None:
        return tokens, eval_tokens, {"hash": tensor_digest(tokens), "version": "given"}
    from tl_featureflow.saes.corpus import load_corpus

    corpus = load_corpus(model.tokenizer, "train", context_size=preset.context_size, progress=progress)
    if eval_tokens is None:
        eval_tokens = load_corpus(model.tokenizer, "heldout", context_size=preset.context_size,
                                  progress=progress).tokens
    return corpus.tokens, eval_tokens, {"hash": corpus.hash, "version": corpus.meta["version"]}


def _claim_run_folder(out: Path, run: dict[str, Any]) -> None:
    """Make ``out`` this run's folder; a folder of another run (or of anything else) is refused."""
    run_file = out / "run.json"
    clean_debris(run_file)      # a run killed while writing run.json left only its .run.json.<pid>.*.tmp
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != run:
            changed = sorted(k for k in run if run[k] != previous.get(k))
            raise CacheError(f"{out} holds another training run (differs in {changed}): use another folder")
    elif out.exists() and any(out.iterdir()):
        raise CacheError(f"refusing to train into {out}: it exists, is not empty and holds no training run")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, run)


def _new_training_saes(hooks: dict[str, str], d_model: int, preset: Preset, device: str, seed: int,
                       model_name: str) -> dict[str, Any]:
    """One freshly initialised (seeded) SAELens BatchTopK training SAE per name."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(seed)
    saes = {}
    for name, hook in hooks.items():
        cfg = BatchTopKTrainingSAEConfig(d_in=d_model, d_sae=preset.expansion * d_model, k=preset.k, device=device,
                                         normalize_activations="expected_average_only_in")
        saes[name] = BatchTopKTrainingSAE(cfg)
        saes[name].cfg.metadata.hook_name = hook
        saes[name].cfg.metadata.model_name = model_name
    return saes


def _fit(saes: dict[str, Any], hooks: dict[str, str], stream: ActivationStream, preset: Preset, d_model: int,
         checkpoint_dir: Path, device: str, progress: bool, trainer: str = "fast") -> tuple[dict[str, Any], float]:
    """Drive SAELens's MultiSAETrainer over the stream, resuming from the newest complete checkpoint."""
    from sae_lens.config import SAETrainerConfig

    trainer_cfg = SAETrainerConfig(
        total_training_samples=preset.training_tokens, train_batch_size_samples=preset.batch_tokens,
        lr=preset.lr, lr_end=preset.lr / 10, device=device, dead_feature_window=preset.dead_feature_window,
        feature_sampling_window=max(preset.dead_feature_window, 100), n_checkpoints=preset.n_checkpoints,
        checkpoint_path=str(checkpoint_dir), n_batches_for_norm_estimate=preset.n_norm_batches,
    )
    multi: Any

    def mark_complete(checkpoint_path: Path | None) -> None:
        if checkpoint_path is not None:
            atomic_write_json(checkpoint_path / _COMPLETE, {"steps_done": multi.n_training_steps + 1})

    multi = _compat.multi_sae_trainer_class()(cfg=trainer_cfg, saes=saes, hook_names=hooks, data_provider=iter(()),
                                              save_checkpoint_fn=mark_complete)
    if trainer == "fast":
        for name, sae_trainer in multi.trainers.items():
            reason = fast_step.use_fast_step(sae_trainer)
            if reason is not None:
                warnings.warn(f"{name}: SAELens's own training step ({reason})", stacklevel=3)
    resume = _latest_checkpoint(checkpoint_dir)
    if resume is not None:
        multi.load_checkpoint(resume)
        _compat.advance_past_checkpoint(multi)   # SAELens saves inside the step, before its counters advance
        if progress:
            print(f"resuming from {resume} at {multi.n_training_samples:,} tokens")
    multi.data_provider = _ProgressStream(stream.iterate(multi.n_training_steps), preset, multi.n_training_samples,
                                          progress)
    start = time.perf_counter()
    try:
        with _compat.quiet_sae_lens_bars():
            if resume is None:  # the scaling factors come back with a checkpoint
                norm_batches = [stream.batch(i) for i in range(preset.n_norm_batches)]
                for name, trainer in multi.trainers.items():
                    _compat.estimate_scaling_factor(trainer, d_model, iter([b[hooks[name]] for b in norm_batches]),
                                                    preset.n_norm_batches)
            trained = multi.fit()
    finally:
        multi.data_provider.close()  # type: ignore[attr-defined]
    return trained, time.perf_counter() - start


def _to_inference(trained: dict[str, Any], names: dict[str, Key], out: Path | None, device: str) -> dict[Key, Any]:
    """BatchTopK -> JumpReLU with SAELens's own conversion (save_inference_model, load_from_disk), through a
    temporary folder in ``out`` (the system's when None)."""
    from sae_lens.saes.sae import SAE

    inference: dict[Key, Any] = {}
    # in the run folder, named as clean_debris knows: a run killed here leaves no folder behind its resume
    scratch = scratch_directory(out / "inference") if out is not None else tempfile.TemporaryDirectory()
    with scratch as final:
        for name, sae in trained.items():
            sae.save_inference_model(Path(final) / name)
            inference[names[name]] = SAE.load_from_disk(Path(final) / name, device=device)
    return inference


def _per_feature_thresholds(model: HookedTransformer, inference: dict[Key, Any], tokens: Tensor, preset: Preset,
                            seed: int, progress: bool) -> tuple[dict[Key, Any], dict[str, Any]]:
    """One JumpReLU threshold per feature (:mod:`~tl_featureflow.saes.thresholds`) unless the preset keeps SAELens's one."""
    if not preset.calibration_tokens:
        return inference, {"thresholds": {"method": "one per SAE (SAELens's BatchTopK conversion)"}}
    from tl_featureflow.saes.thresholds import calibrate_bank

    bank = calibrate_bank(model, SAEBank(inference), tokens, n_tokens=preset.calibration_tokens, seed=seed + 1,
                          progress=progress)
    return dict(bank.items()), {"thresholds": bank.metadata["thresholds"]}


def _quality(model: HookedTransformer, inference: dict[Key, Any], eval_tokens: Tensor | None, preset: Preset, out: Path,
             progress: bool) -> dict[str, Any] | None:
    """The quality report on held-out rows (None without them); flagged SAEs warn."""
    if eval_tokens is None:
        return None
    from tl_featureflow.saes.quality import evaluate_bank

    report = evaluate_bank(model, SAEBank(inference), eval_tokens[:preset.eval_rows], loss_rows=preset.loss_rows,
                           progress=progress)
    report.meta["training_tokens"] = preset.training_tokens
    if progress:
        print(report.table())
    report.warn_if_flagged(f"the bank trained in {out}")
    return report.to_dict()


def _versions() -> dict[str, str]:
    import sae_lens

    import tl_featureflow

    return {"tl_featureflow": tl_featureflow.__version__, "sae_lens": sae_lens.__version__,
            "torch": torch.__version__}


class _ProgressStream:
    """Wraps the batch iterator with a progress bar showing tokens/s and ETA."""

    def __init__(self, batches: Iterator[dict[str, Tensor]], preset: Preset, done: int, progress: bool):
        from tqdm.auto import tqdm

        self._batches = batches
        self._bar = tqdm(total=preset.training_tokens, initial=done, unit="tok", unit_scale=True,
                         desc=f"training SAEs ({preset.name})", disable=not progress, smoothing=0.05)
        self._step = preset.batch_tokens

    def __iter__(self) -> _ProgressStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        batch = next(self._batches)
        self._bar.update(self._step)
        return batch

    def close(self) -> None:
        self._bar.close()
