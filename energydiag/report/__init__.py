"""Layer 6, rendering: rich tables, strict JSON, CI formats, plots and tables on disk.

Renderers lay out what analyses returned; they never compute a statistic.
"""
