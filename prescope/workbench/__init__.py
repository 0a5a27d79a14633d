"""The workbench: what notebooks, reports and sweeps are made of.

- `steps`: the notebooks' shared steps (load, trace, simulate, compare); `results`: the committed GPU results
  (H200 tables, comparison runs, a measured timeline beside its simulation); `viz`: plotly figures;
  `widgets`: ipywidgets dashboards;
- `metrics`: each notebook's recorded metrics; `reports`: notebooks run and rendered into `reports/`;
- `sweep`, `raysweep`: a notebook over a parameter grid, on this machine or a Ray cluster.
"""
