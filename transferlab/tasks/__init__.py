"""Tasks: what differs between families (models, loss, batch structure); the trainer is shared."""

from transferlab.tasks.classify import ClassifyTask
from transferlab.tasks.kd import KDTask

TASKS = {"classify": ClassifyTask, "kd": KDTask}


def create_task(config, num_classes: int):
    return TASKS[config.task](config, num_classes)
