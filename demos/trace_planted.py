"""Trace a feature end to end on a small planted bank (runs in a second, no model needed).

    .venv/bin/python demos/trace_planted.py

The bank's decoders are built so that the right answers are known: a residual chain
0/res/3 -> 1/res/7 -> 2/res/1 -> 3/res/5 whose consecutive cosines are 0.9, 0.6 and
0.3, an MLP feature that adds what the chain gains at layer 2, a newborn feature at
2/res/0 copied from 2/mlp/1, and an unexplained one at 2/res/10.
"""

from __future__ import annotations

import tl_featureflow as ff
from tl_featureflow.synthetic import planted_chain_bank


def main() -> None:
    bank, truth = planted_chain_bank()
    tracer = ff.FlowTracer(bank)
    print(">>> tracer.predecessors('2/res/1')")
    print(tracer.predecessors("2/res/1"))
    print("\n>>> tracer.classify(2, thresholds='paper').counts()")
    result = tracer.classify(2, thresholds="paper")
    print(result.counts(), "with thresholds", result.thresholds)
    print("\n>>> graph = tracer.trace('1/res/7', t_res=0.5, t_module=0.15)")
    graph = tracer.trace("1/res/7", t_res=0.5, t_module=0.15)
    print("span:", graph.span, " chain:", [str(r) for r in graph.chain], " modules:", [str(r) for r in graph.modules])
    for edge in graph.edges:
        print(f"  {edge.src} -> {edge.dst}  cos {edge.score:.2f}")
    print("\n>>> tracer.flow_map(thresholds='paper').chain_lengths(0.25)[3][5]  # 3/res/5 survives 3 layers back")
    print(int(tracer.flow_map(thresholds="paper", progress=False).chain_lengths(0.25)[3][5]))


if __name__ == "__main__":
    main()
