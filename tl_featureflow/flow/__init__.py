"""Feature flow (method sections 2-4): data-free matching of SAE features across layers.

``matching`` (pure maths) · ``tracer`` (FlowTracer) · ``graph`` (FlowGraph) · ``flowmap``
(FlowMap, written layer by layer) · ``origins`` (translated / processed / newborn labels)
· ``contexts`` (top activating contexts).
"""
