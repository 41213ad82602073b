"""Steering (method section 6): push features along their flow graphs during generation.

``steerer`` (Steerer) · ``sweeps`` (grids of settings as batched generate calls) · ``judge``
(the offline judge) · ``themes`` (seed features for a topic).
"""
