"""Causal checks (method section 5): deactivate matched predecessors and measure the target.

``interventions`` (the rescale edit as hooks, layer-local batched reruns) · ``experiment``
(validate: the paper's protocol) · ``results`` (ValidationReport, the 8 activation groups).
"""
