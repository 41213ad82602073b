"""Steering (method section 6): push features along their flow graphs during generation.

``steerer`` (Steerer) · ``sweeps`` (grids of settings as batched generate calls) · ``judge``
(the offline judge) · ``judge_set`` (its labelled set and AUC) · ``themes`` (seed features for a
topic) · ``probe`` (seeds ranked by a steering probe) · ``report_card`` (prompting vs one feature vs
the flow graph, AxBench-style).
"""

from tl_featureflow._lazy import submodule_getattr

__getattr__, __dir__ = submodule_getattr(__name__, {"ProbeSettings": "probe", "ThemeSettings": "themes"})
