"""Feature flow (method sections 2-4): data-free matching of SAE features across layers.

``matching`` (pure maths) · ``tracer`` (FlowTracer) · ``graph`` (FlowGraph) · ``flowmap``
(FlowMap, written layer by layer) · ``origins`` (translated / processed / newborn labels)
· ``contexts`` (top activating contexts).
"""

from tl_featureflow._lazy import submodule_getattr

__getattr__, __dir__ = submodule_getattr(__name__)
