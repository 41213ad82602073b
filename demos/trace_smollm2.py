"""Trace a real feature of the embedded SmolLM2 end to end (needs its quick bank).

    .venv/bin/python demos/trace_smollm2.py

Finds the layer-15 residual feature most specific to " Paris" in a prompt, then asks
where it comes from (predecessors), how the layer's features arose (classify), and
traces its flow across the bank's layers with logit-lens labels.
"""

from __future__ import annotations

import torch

import tl_featureflow as ff

PROMPT = "The Eiffel Tower is located in the city of Paris"
LAYER = 15


def main() -> None:
    model = ff.load_embedded_model()
    bank = ff.load_embedded_bank("quick", model=model)
    tracer = ff.FlowTracer(bank, model)
    tokens = model.to_tokens(PROMPT)
    _, feats = model.run_with_features(tokens, sites=["res"], layers=[LAYER], bank=bank, return_logits=False)
    acts_all = feats["res", LAYER][0]
    acts = acts_all[-1]
    # specific to " Paris": active there, not on the prompt's other tokens
    index = int((acts - acts_all[1:-1].max(0).values).argmax())
    seed = ff.FeatureRef(LAYER, "res", index)
    print(f"prompt: {PROMPT!r}; bank: {bank.describe()}")
    print(f"layer-{LAYER} res feature most specific to ' Paris': {seed} (activation {float(acts[index]):.2f}, "
          f"at most {float(acts_all[1:-1, index].max()):.2f} on the other tokens)")
    print(f"\n>>> tracer.labels.logit_lens('{seed}')")
    print([(tok, round(v, 2)) for tok, v in tracer.labels.logit_lens(seed, k=6)])
    print(f"\n>>> tracer.predecessors('{seed}', k=2)")
    print(tracer.predecessors(seed, k=2))
    result = tracer.classify(LAYER)
    print(f"\n>>> tracer.classify({LAYER}).counts()   # thresholds: {result.method}")
    print(result.counts(), {s: round(t, 3) for s, t in result.thresholds.items()})
    print(f"label of {seed}: {result.label(index)}")
    graph = tracer.trace(seed)
    print(f"\n>>> graph = tracer.trace('{seed}')   # t_res=0.5, t_module=0.15")
    print(f"span {graph.span}, {len(graph.chain)} chain nodes, {len(graph.modules)} module nodes")
    for edge in graph.edges:
        print(f"  {str(edge.src):>12} -> {str(edge.dst):<12} cos {edge.score:.2f}   {graph.node(edge.src).label}")
    with torch.no_grad():
        print("\nfeature activation along the chain on the prompt's last token:")
        _, chain_feats = model.run_with_features(tokens, sites=["res"], bank=bank, return_logits=False)
        for ref in graph.chain:
            print(f"  {ref}: {float(chain_feats[ref][0, -1]):.2f}")


if __name__ == "__main__":
    main()
