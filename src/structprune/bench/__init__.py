"""Benchmarks behind `structprune bench quality` and `structprune report` (PROTOCOL.md).

protocol.py  what a run measures (BenchSettings, defaults, cell keys)
measure.py   memory and time of a pruning call
quality.py   the harness: methods x sparsity, resumable, one JSON file a run
results.py   the run's JSON: read, write atomically, Markdown tables
report.py    Markdown and PNG plots of saved runs
"""

from .protocol import (DEFAULT_CALIB, DEFAULT_METHODS, DEFAULT_SPARSITIES, DEFAULT_TEXTS, FULL, QUICK, BenchSettings,
                       cell_key, parse_field, settings_from_protocol)
from .quality import run_quality
from .results import load_results, render, write_atomic

__all__ = ["DEFAULT_CALIB", "DEFAULT_METHODS", "DEFAULT_SPARSITIES", "DEFAULT_TEXTS", "FULL", "QUICK", "BenchSettings",
           "cell_key", "load_results", "parse_field", "render", "run_quality", "settings_from_protocol",
           "write_atomic"]
