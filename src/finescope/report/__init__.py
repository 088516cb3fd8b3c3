"""The run report: results table in the paper's layout, plots, selection evidence, timings, model card.

    finescope report runs/default          # (re)writes runs/default/report/{report.md,report.html,plots/}

tables.py collects the run directory into plain data and renders tables; plots.py draws the PNGs; card.py writes
the model card; run.py puts them together. Only files of the run directory are read.
"""
