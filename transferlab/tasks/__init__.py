"""Tasks: what differs between families (models, loss, batch structure); the trainer is shared."""

from transferlab.tasks.classify import ClassifyTask
from transferlab.tasks.dml import DMLTask
from transferlab.tasks.kd import KDTask
from transferlab.tasks.sla import SLASelfDistillTask

TASKS = {"classify": ClassifyTask, "kd": KDTask, "dml": DMLTask, "sla_sd": SLASelfDistillTask}


def create_task(config, num_classes: int, num_train_examples: int = 0):
    return TASKS[config.task](config, num_classes, num_train_examples)
