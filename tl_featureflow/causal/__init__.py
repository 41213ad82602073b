"""Causal checks (method section 5): deactivate matched predecessors and measure the target.

``interventions`` (the rescale edit as hooks, layer-local batched reruns) · ``experiment``
(validate: the paper's protocol) · ``results`` (ValidationReport, the 8 activation groups).
"""

from tl_featureflow._lazy import submodule_getattr

__getattr__, __dir__ = submodule_getattr(__name__, {"ValidationSettings": "experiment"})
