"""Files in and out: a pruned model's folder (checkpoint.py), a MODEL argument resolved to a model
(resolve.py), dtype names (dtypes.py), the plan's plot (plots.py).

The package exports the checkpoint API, so `structprune.io.save_pruned` and friends read as one
verb each; model resolution is imported from `structprune.io.resolve` (it reaches the streaming
source, which the checkpoint side never needs).
"""

from .checkpoint import (CONFIG_NAME, INDEX_NAME, PLAN_NAME, PROGRESS_NAME, REST_NAME, WEIGHTS_NAME, ShardWriter,
                         check_output_dir, drop_non_layer_parameters, is_pruned_folder, load_plan, load_pruned,
                         partial_dir, save_pruned)

__all__ = ["CONFIG_NAME", "INDEX_NAME", "PLAN_NAME", "PROGRESS_NAME", "REST_NAME", "WEIGHTS_NAME", "ShardWriter",
           "check_output_dir", "drop_non_layer_parameters", "is_pruned_folder", "load_plan", "load_pruned",
           "partial_dir", "save_pruned"]
