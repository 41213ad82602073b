"""How good is an SAE bank? Explained variance, L0, dead features, LM loss recovered.

Measured on held-out tokens (position 0 skipped, as in training):

- explained variance: ``1 - sum |x - sae(x)|^2 / sum |x - mean(x)|^2`` over tokens;
- L0: mean number of active features per token;
- dead fraction: features never active on the evaluation tokens;
- loss recovered: ``(CE_zero - CE_sae) / (CE_zero - CE_clean)`` when this SAE alone is
  spliced in (its reconstruction replaces the site's activations) against zero-ablating
  the site, SAELens's "CE loss score".

A bank whose SAEs fall below ``floor`` explained variance is flagged loudly. And since
explained variance plateaus long before the decoder directions that data-free matching
compares stop improving (docs/results.md, "What a bank's training budget buys"), the
report also says when a bank's SAEs saw fewer training tokens than
:data:`MATCHING_KNEE`, where top-1 causal matching stopped improving on the embedded model.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_featureflow.backend import backend_of
from tl_featureflow.refs import Site, block_of, resid_pre_hook
from tl_featureflow.saes import sites
from tl_featureflow.saes.bank import SAEBank

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["SAEQuality", "QualityReport", "evaluate_bank", "BankQualityWarning", "MATCHING_KNEE"]

DEFAULT_FLOOR = 0.5
#: Training tokens per SAE where top-1 causal matching (layer 15 of the embedded model, the paper
#: preset's checkpoints) stopped improving: 35% at 393k, 46% at 787k, 51% at 1.18M, 49% at 1.57M
#: tokens (docs/results.md, "What a bank's training budget buys"). Measured at 3 x d_model, k=32; a dictionary
#: twice as wide is still undertrained there (23% of res 15 dead, the fidelity grid), so its knee lies later.
MATCHING_KNEE = 1_179_648


class BankQualityWarning(UserWarning):
    """Some SAEs of a bank reconstruct their site poorly (below the explained-variance floor)."""


@dataclass
class SAEQuality:
    site: Site
    layer: int
    explained_variance: float
    l0: float
    dead_fraction: float
    loss_recovered: float | None = None
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero: float | None = None


@dataclass
class QualityReport:
    rows: list[SAEQuality]
    floor: float = DEFAULT_FLOOR
    n_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        ev = [r.explained_variance for r in self.rows]
        mean = f", mean explained variance {sum(ev) / len(ev):.3f}" if ev else ""
        return (f"QualityReport({len(self.rows)} SAEs on {self.n_tokens:,} tokens{mean}, {len(self.flagged())} "
                f"below {self.floor:g}; .table() for the rows)")

    def flagged(self) -> list[tuple[Site, int]]:
        """SAEs whose explained variance is below the floor."""
        return [(r.site, r.layer) for r in self.rows if r.explained_variance < self.floor]

    def below_knee(self) -> bool:
        """Whether the SAEs saw fewer training tokens (``meta["training_tokens"]``) than the knee of
        the tokens curve (:data:`MATCHING_KNEE`)."""
        tokens = self.meta.get("training_tokens")
        return tokens is not None and tokens < MATCHING_KNEE

    def table(self) -> str:
        """A Markdown table, one row per SAE (and a warning line when the bank is below the knee)."""
        lines = ["| SAE | explained var. | L0 | dead | loss recovered |", "|---|---|---|---|---|"]
        for r in self.rows:
            lr = "-" if r.loss_recovered is None else f"{r.loss_recovered:.3f}"
            flag = " (below floor)" if r.explained_variance < self.floor else ""
            lines.append(f"| {r.layer}/{r.site} | {r.explained_variance:.3f}{flag} | {r.l0:.1f} | "
                         f"{r.dead_fraction:.1%} | {lr} |")
        if self.below_knee():
            lines.append(f"\nWarning: these SAEs saw {self.meta['training_tokens']:,} training tokens each. Explained "
                         "variance plateaus early, but the decoder directions that flow matching compares keep "
                         f"improving: on the embedded model top-1 causal matching improved up to about "
                         f"{MATCHING_KNEE:,} tokens (docs/results.md). Treat flow matches from this bank as a "
                         "lower bound of what the method gives; the paper preset trains past the knee.")
        return "\n".join(lines)

    def median(self, metric: str, site: Site | None = None) -> float:
        values = sorted(getattr(r, metric) for r in self.rows if site is None or r.site == site)
        if not values:
            raise ValueError(f"no rows for site {site!r}")
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"floor": self.floor, "n_tokens": self.n_tokens, "meta": self.meta,
                "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityReport:
        return cls([SAEQuality(**r) for r in data["rows"]], data["floor"], data["n_tokens"], data.get("meta", {}))

    @classmethod
    def of_bank(cls, bank: SAEBank) -> QualityReport | None:
        """The report saved in a bank's metadata (with its training tokens), or None."""
        if not bank.metadata.get("quality"):
            return None
        report = cls.from_dict(bank.metadata["quality"])
        if bank.metadata.get("training_tokens") is not None:
            report.meta.setdefault("training_tokens", bank.metadata["training_tokens"])
        return report

    def warn_if_flagged(self, what: str = "the bank") -> None:
        bad = self.flagged()
        if bad:
            warnings.warn(
                f"{what}: {len(bad)} of {len(self.rows)} SAEs explain less than {self.floor:.0%} of their "
                f"site's variance on held-out text: {bad}. Results that use them are unreliable; "
                "train longer (a larger preset) or check the data.", BankQualityWarning, stacklevel=3)


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions 1.. (predictions made from position >= 1)."""
    logp = logits[:, 1:-1].log_softmax(-1)
    return -logp.gather(-1, tokens[:, 2:, None]).mean()


@torch.no_grad()
def evaluate_bank(
    model: HookedTransformer,
    bank: SAEBank,
    tokens: Int[Tensor, "n_rows ctx"],
    *,
    batch_size: int = 8,
    loss_rows: int = 16,
    floor: float = DEFAULT_FLOOR,
    progress: bool = True,
) -> QualityReport:
    """Measure every SAE of ``bank`` on ``tokens`` (held-out rows starting with BOS).

    The loss-recovered score needs two extra forward passes per SAE; it is measured on
    the first ``loss_rows`` rows only (``loss_rows=0`` skips it).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    names = {key: bank.hook(key) for key in bank}                   # a z-SAE reads (and is measured on) hook_z
    reads = {key: bank.read_hook(key) for key in bank}               # a transcoder reads the MLP's input
    stats = {key: {"sse": 0.0, "sum": torch.zeros(sae.cfg.d_in, dtype=torch.float64),
                   "sumsq": 0.0, "n": 0, "l0": 0.0,
                   "fired": torch.zeros(bank.d_sae(*key), dtype=torch.bool)} for key, sae in bank.items()}
    stop = block_of(max(bank.layers)) + 1
    backend = backend_of(model)
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluating SAEs", disable=not progress):
        batch = tokens[start:start + batch_size].to(device)
        cache = backend.run_with_cache(batch, sorted({*names.values(), *reads.values()}), stop_at_layer=stop)
        for key, sae in bank.items():
            h = cache[names[key]][:, 1:].to(sae.W_dec.dtype)
            h_in = cache[reads[key]][:, 1:].to(sae.W_dec.dtype)
            acts = sae.encode(sites.sae_input(sae, h_in)).flatten(0, 1)
            x = h.flatten(2).flatten(0, 1)
            # a transcoder's reconstruction is its whole forward (a skip transcoder adds x @ W_skip.T)
            recon = (sae(h_in) if reads[key] != names[key] else sae.decode(acts)).reshape(x.shape)
            s = stats[key]
            s["sse"] += float(((x - recon) ** 2).double().sum())
            s["sum"] += x.double().sum(0).cpu()
            s["sumsq"] += float((x.double() ** 2).sum())
            s["n"] += x.shape[0]
            s["l0"] += float((acts > 0).sum())
            s["fired"] |= (acts > 0).any(0).cpu()
    rows = []
    for key, s in stats.items():
        total_var = s["sumsq"] - float((s["sum"] ** 2).sum()) / s["n"]
        rows.append(SAEQuality(key[0], key[1], explained_variance=1 - s["sse"] / max(total_var, 1e-12),
                               l0=s["l0"] / s["n"], dead_fraction=1 - float(s["fired"].float().mean())))
    if loss_rows > 0:
        # Each SAE sits inside block L, so its effect on the loss needs only blocks L.. rerun,
        # from the cached residual stream entering layer L.
        loss_tokens = tokens[:loss_rows].to(device)
        starts = {row.layer: resid_pre_hook(block_of(row.layer)) for row in rows}   # the embedding SAE: block 0
        resid: dict[str, Tensor] = {}

        def record(act: Tensor, hook: Any) -> None:
            resid[hook.name] = act

        clean_logits = backend.run_with_hooks(loss_tokens, [(name, record) for name in set(starts.values())])
        clean = float(_ce(clean_logits, loss_tokens))
        for row in tqdm(rows, desc="loss recovered", disable=not progress):
            sae = bank[row.site, row.layer]
            kept: dict[str, Tensor] = {}

            def keep(act: Tensor, hook: Any, kept: dict = kept) -> None:
                kept["x"] = act

            def splice(act: Tensor, hook: Any, sae: Any = sae, kept: dict = kept) -> Tensor:
                out = act.clone()
                inner = act[:, 1:]
                source = kept.pop("x", act)[:, 1:]          # a transcoder's input, else the site's own tensor
                out[:, 1:] = sae(sites.sae_input(sae, source.to(sae.W_dec.dtype))).reshape(inner.shape).to(act.dtype)
                return out

            def zero(act: Tensor, hook: Any) -> Tensor:
                out = act.clone()
                out[:, 1:] = 0
                return out

            name, start = names[(row.site, row.layer)], resid[starts[row.layer]]
            ce = {}
            read = reads[(row.site, row.layer)]
            for label, edit in (("spliced", splice), ("zero", zero)):
                hooks = [(name, edit)] if read == name else [(read, keep), (name, edit)]
                with backend.hooks(hooks):
                    logits = backend.run_from_layer(start, block_of(row.layer))
                ce[label] = float(_ce(logits, loss_tokens))
            row.ce_clean, row.ce_spliced, row.ce_zero = clean, ce["spliced"], ce["zero"]
            row.loss_recovered = (ce["zero"] - ce["spliced"]) / (ce["zero"] - clean) if ce["zero"] != clean else None
    return QualityReport(rows, floor, int(sum(s["n"] for s in stats.values()) // max(1, len(stats))))
