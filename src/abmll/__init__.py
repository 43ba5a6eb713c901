"""abmll: Amortized Bayesian Meta-Learning for LoRA (Zhang, Snell & Griffiths, 2025).

A learned global Gaussian prior θ over LoRA weights; a posterior φ for each new task reached by a few
gradient steps from θ; predictions averaged over posterior samples.
"""

from abmll.bayes import adapters_disabled, bayes_layers, inject, posterior, prior, weight_sample
from abmll.checkpoint import load_checkpoint, load_prior_into, save_checkpoint
from abmll.config import ABMLLConfig, preset
from abmll.errors import AbmllError, CheckpointError, ConfigError, DataError, ModelError
from abmll.interop import export_merged, export_peft, import_peft, load, task_posterior
from abmll.methods import ABMLL, METHODS, Method, ZeroShot, create_method
from abmll.metrics import task_metrics
from abmll.scoring import Scorer
from abmll.tasks.data import Episode, EpisodeCycle, Example, MetaBatchSampler, Task, make_episode

__version__ = "0.1.0"

__all__ = [
    "ABMLL",
    "ABMLLConfig",
    "METHODS",
    "AbmllError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Episode",
    "EpisodeCycle",
    "Example",
    "MetaBatchSampler",
    "Method",
    "ModelError",
    "Scorer",
    "Task",
    "ZeroShot",
    "adapters_disabled",
    "bayes_layers",
    "create_method",
    "export_merged",
    "export_peft",
    "import_peft",
    "inject",
    "load",
    "load_checkpoint",
    "load_prior_into",
    "make_episode",
    "posterior",
    "preset",
    "prior",
    "save_checkpoint",
    "task_metrics",
    "task_posterior",
    "weight_sample",
]
