"""Figures and reports: result objects in, plotly figures and one offline HTML report out.

``plot`` (go.Figure builders) · ``html`` (the report).
"""
