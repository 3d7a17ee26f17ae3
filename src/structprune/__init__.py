"""structprune: structured pruning (attention heads and FFN neurons) of decoder LLMs, streamed
one layer at a time (STRUPRUNE, arXiv 2510.03246)."""

from .api import evaluate_perplexity, finetune, prune
from .config import PruneConfig
from .evaluate import perplexity
from .io import load_pruned, save_pruned
from .io.resolve import load_model
from .methods.output import PruneResult
from .plan import PrunePlan

__all__ = ["PruneConfig", "PrunePlan", "PruneResult", "evaluate_perplexity", "finetune", "load_model", "load_pruned", "perplexity",
           "prune", "save_pruned"]
__version__ = "0.1.0"
