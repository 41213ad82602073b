"""A transcoder as the ``mlp`` site of the paper bank at layer 15, measured by Table 1 (issue 27).

    .venv/bin/python demos/transcoder_site.py train   [--out featureflow-out/transcoder] [--tokens 1572864]
    .venv/bin/python demos/transcoder_site.py measure [--out featureflow-out/transcoder] [--texts 12]

``train`` trains one BatchTopK transcoder that reads ``blocks.15.ln2.hook_normalized`` (what the MLP
reads) and writes ``blocks.15.hook_mlp_out``, with the budget and recipe of the shipped ``paper``
bank's ``mlp 15`` SAE (k = 16, d_sae = 3 x d_model, 1,572,864 tokens of the same corpus, batches of 256,
Adam at 3e-3, AuxK for dead latents), then puts it in place of that SAE in a copy of the paper bank
(``OUT/bank``). SAELens has transcoder classes but no transcoder trainer, so the loop is here (plain
torch, about 60 lines); the result is SAELens's own ``JumpReLUTranscoder`` with the BatchTopK
conversion's one threshold (our per-feature calibration refuses transcoders). Resumable
(``OUT/checkpoint.pt``, written atomically every quarter).

``measure`` runs Table 1 the paper's way (``featureflow validate --paper``'s protocol: 12 held-out
texts, r = 0, Pearson from 100K training tokens, live features, the paper's target set) at layer 15
with the paper bank and with the transcoder bank, and prints the overall and per-group rows.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import tl_featureflow as ff
from tl_featureflow._files import atomic_write_json
from tl_featureflow.saes import training
from tl_featureflow.saes.presets import PRESETS
from tl_featureflow.saes.stream import ActivationStream

LAYER = 15
IN_HOOK, OUT_HOOK = f"blocks.{LAYER}.ln2.hook_normalized", f"blocks.{LAYER}.hook_mlp_out"
PRESET = PRESETS["paper"]


class BatchTopKTranscoder(torch.nn.Module):
    """``y ~ BatchTopK(x W_enc + b_enc) W_dec + b_dec`` with unit-norm decoder rows (inputs pre-scaled)."""

    def __init__(self, d_in: int, d_sae: int, d_out: int, k: float):
        super().__init__()
        W_dec = torch.randn(d_sae, d_out)
        self.W_dec = torch.nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True))
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae) / math.sqrt(d_in))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pre = x @ self.W_enc + self.b_enc
        acts = pre.relu()
        keep = int(self.k * x.shape[0])
        values, flat = acts.flatten().topk(keep, sorted=False)
        sparse = torch.zeros_like(acts).flatten().scatter(0, flat, values).view_as(acts)
        return sparse @ self.W_dec + self.b_dec, sparse, pre


def _scale(stream: ActivationStream, hook: str, n: int) -> float:
    """sqrt(d) / mean norm over the first ``n`` batches (SAELens's ``expected_average_only_in``)."""
    norms = torch.cat([stream.batch(i)[hook].norm(dim=1) for i in range(n)])
    return math.sqrt(norms.new_tensor(stream.batch(0)[hook].shape[1]).item()) / norms.mean().item()


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ff.load_embedded_model()
    tokens, eval_tokens, _ = training._training_rows(model, PRESET, None, None, True)
    stream = ActivationStream(model, tokens, [IN_HOOK, OUT_HOOK], batch_tokens=PRESET.batch_tokens,
                              chunk_rows=PRESET.chunk_rows, seed=args.seed, last_block=LAYER)
    d = model.cfg.d_model
    tc = BatchTopKTranscoder(d, int(PRESET.expansion * d), d, PRESET.k)
    optimizer = torch.optim.Adam(tc.parameters(), lr=PRESET.lr)
    steps = args.tokens // PRESET.batch_tokens
    state = {"step": 0, "threshold": 0.0, "last_fired": torch.zeros(tc.W_dec.shape[0], dtype=torch.long),
             "seconds": 0.0}
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        saved = torch.load(checkpoint)
        tc.load_state_dict(saved["model"]), optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        sx, sy = saved["scales"]
        print(f"resuming at step {state['step']} of {steps}")
    else:
        sx, sy = _scale(stream, IN_HOOK, PRESET.n_norm_batches), _scale(stream, OUT_HOOK, PRESET.n_norm_batches)
        with torch.no_grad():
            tc.b_dec.copy_(torch.cat([stream.batch(i)[OUT_HOOK] for i in range(PRESET.n_norm_batches)]).mean(0) * sy)
    start = time.perf_counter() - state["seconds"]
    batches = stream.iterate(state["step"])
    for step in tqdm(range(state["step"], steps), desc="transcoder", initial=state["step"], total=steps,
                     mininterval=10):
        batch = next(batches)
        x, y = batch[IN_HOOK] * sx, batch[OUT_HOOK] * sy
        for group in optimizer.param_groups:      # linear decay to lr / 10, as the bank's trainer
            group["lr"] = PRESET.lr * (1 - 0.9 * step / steps)
        recon, sparse, pre = tc(x)
        mse = (recon - y).pow(2).sum(1).mean()
        fired = (sparse > 0).any(0)
        state["last_fired"][fired] = step
        dead = step - state["last_fired"] > PRESET.dead_feature_window
        loss = mse
        if dead.any():                            # AuxK (SAELens's BatchTopK): dead latents fit what the live ones missed
            k_aux = d // 2
            n_dead = int(dead.sum())
            values, index = pre.relu().masked_fill(~dead, 0).topk(min(k_aux, n_dead), dim=1)
            aux = torch.zeros_like(pre).scatter(1, index, values) @ tc.W_dec
            loss = mse + min(n_dead / k_aux, 1.0) * (aux - (y - recon).detach()).pow(2).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            tc.W_dec /= tc.W_dec.norm(dim=1, keepdim=True)
            kept = sparse[sparse > 0]
            if kept.numel():
                minimum = kept.min().item()
                state["threshold"] = minimum if step == 0 else 0.99 * state["threshold"] + 0.01 * minimum
        state["step"] = step + 1
        if state["step"] % max(1, steps // 4) == 0 or state["step"] == steps:
            state["seconds"] = time.perf_counter() - start
            tmp = checkpoint.with_suffix(".pt.tmp")
            torch.save({"model": tc.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "scales": (sx, sy)}, tmp)
            tmp.replace(checkpoint)
    seconds = time.perf_counter() - start
    bank = _bank_with(tc, sx, sy, state["threshold"], model)
    bank.metadata.update({"transcoder": {"layer": LAYER, "in": IN_HOOK, "out": OUT_HOOK, "tokens": args.tokens,
                                         "train_seconds": round(seconds, 1), "threshold": state["threshold"]}})
    quality = _quality(model, bank, eval_tokens[:PRESET.eval_rows])
    bank.metadata["transcoder"]["quality"] = quality
    bank.save(out / "bank")
    atomic_write_json(out / "train.json", bank.metadata["transcoder"])
    print(json.dumps(bank.metadata["transcoder"], indent=1))


def _bank_with(tc: BatchTopKTranscoder, sx: float, sy: float, threshold: float, model) -> ff.SAEBank:
    """The paper bank with ``mlp 15`` replaced by SAELens's JumpReLUTranscoder, scales folded in."""
    from sae_lens import JumpReLUTranscoder, JumpReLUTranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    d_sae, d = tc.W_dec.shape
    cfg = JumpReLUTranscoderConfig(d_in=d, d_sae=d_sae, d_out=d, apply_b_dec_to_input=False,
                                   metadata=SAEMetadata(hook_name=IN_HOOK, hook_name_out=OUT_HOOK))
    sae = JumpReLUTranscoder(cfg)
    with torch.no_grad():                         # x sx W_enc = x (sx W_enc); y = (recon) / sy
        sae.W_enc.copy_(tc.W_enc * sx)
        sae.b_enc.copy_(tc.b_enc)
        sae.W_dec.copy_(tc.W_dec / sy)
        sae.b_dec.copy_(tc.b_dec / sy)
        sae.threshold.fill_(threshold)
    paper = ff.load_embedded_bank("paper", model=model, train=False)
    return ff.SAEBank({**paper, ("mlp", LAYER): sae}, metadata={**paper.metadata, "base": "paper"})


def _quality(model, bank: ff.SAEBank, rows: torch.Tensor) -> dict:
    """Explained variance of ``hook_mlp_out`` and L0 on held-out rows: the transcoder, the paper bank's SAE."""
    paper = ff.load_embedded_bank("paper", model=model, train=False)
    _, cache = model.run_with_cache(rows, names_filter=[IN_HOOK, OUT_HOOK], stop_at_layer=LAYER + 1)
    x, y = cache[IN_HOOK][:, 1:].flatten(0, 1), cache[OUT_HOOK][:, 1:].flatten(0, 1)
    result = {}
    with torch.no_grad():
        for name, sae, inputs in (("transcoder", bank[("mlp", LAYER)], x), ("mlp_out SAE", paper[("mlp", LAYER)], y)):
            acts = sae.encode(inputs)
            recon = sae.decode(acts)
            ev = 1 - (y - recon).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
            result[name] = {"explained_variance": round(ev.item(), 4), "l0": round((acts > 0).sum(1).float().mean().item(), 2),
                            "dead_fraction": round(((acts > 0).sum(0) == 0).float().mean().item(), 4)}
    return result


def measure(args: argparse.Namespace) -> None:
    from tl_featureflow.causal.pearson import training_rows
    from tl_featureflow.causal.protocol import run_paper_protocol, table1_markdown
    from tl_featureflow.flow.contexts import feature_contexts
    from tl_featureflow.saes.corpus import load_corpus

    model = ff.load_embedded_model()
    texts = load_corpus(model.tokenizer, "heldout", progress=False).tokens[: args.texts]
    pearson_rows = training_rows(model, 100_000)
    out = Path(args.out)
    banks = {"paper (mlp_out SAE)": lambda: ff.load_embedded_bank("paper", model=model, train=False),
             "paper, transcoder as mlp 15": lambda: ff.SAEBank.load(out / "bank")}
    for name, load in banks.items():
        tag = "transcoder" if "transcoder" in name else "paper"
        result = out / f"table1-{tag}.md"
        if not result.is_file():
            bank = load()
            alive = feature_contexts(model, bank, progress=False).alive()
            start = time.perf_counter()
            report = run_paper_protocol(model, bank, texts, layers=[LAYER], alive=alive, pearson_tokens=pearson_rows,
                                        pearson_source="offline corpus, train split", progress=True)
            report.save(out / f"validation-{tag}.json")
            command = f"python demos/transcoder_site.py measure --texts {args.texts}  # {time.perf_counter() - start:.0f} s"
            result.write_text(table1_markdown(report, command=command))
        print(f"## {name}\n\n{result.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "measure"])
    parser.add_argument("--out", default="featureflow-out/transcoder")
    parser.add_argument("--tokens", type=int, default=PRESET.training_tokens)
    parser.add_argument("--texts", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train(args) if args.step == "train" else measure(args)


if __name__ == "__main__":
    main()
