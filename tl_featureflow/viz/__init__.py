"""Figures and reports: result objects in, plotly figures and one offline HTML report out.

``plot`` (go.Figure builders) · ``html`` (the report).
"""

from tl_featureflow._lazy import submodule_getattr

__getattr__, __dir__ = submodule_getattr(__name__)
