"""A tiny real-data run for CLI tests: an MLP on UCI digits."""

import ml_collections

from transferlab.config import parse_arg


def get_config(arg=None):
    parse_arg(arg, allowed=())  # takes no argument: `tiny.py:anything` is an error
    c = ml_collections.ConfigDict()
    c.dataset = {"name": "digits"}
    c.model = {"name": "mlp"}
    c.total_steps = 20
    c.batch_size = 32
    c.eval_batch_size = 64
    return c
