"""Training: one method-agnostic loop (:func:`fit`), its config, checkpoints and the default task.

    from lorakit.train import TrainConfig, default_task, default_lora_config, fit
    task = default_task(seed=0)
    lk.inject(task.model, default_lora_config())
    metrics = fit(task.model, task.train, task.eval, TrainConfig(epochs=3, lr=1e-3))
"""

from lorakit.train.checkpoint import find_checkpoint, list_checkpoints
from lorakit.train.config import TrainConfig
from lorakit.train.loop import fit, param_groups, plan_steps
from lorakit.train.measure import evaluate, peak_memory_mb
from lorakit.train.plots import plot_history
from lorakit.train.task import Task, default_lora_config, default_task

__all__ = ["TrainConfig", "fit", "evaluate", "param_groups", "plan_steps", "peak_memory_mb", "plot_history",
           "find_checkpoint", "list_checkpoints", "Task", "default_task", "default_lora_config"]
