"""The Colab notebooks run top to bottom (code cells executed in order, few steps)."""

import glob
import json
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colab", "*.ipynb")))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, monkeypatch, data_dir):
    monkeypatch.setenv("TRANSFERLAB_NOTEBOOK_STEPS", "16")
    with open(path, encoding="utf-8") as f:
        notebook = json.load(f)
    namespace = {"__name__": "__notebook__"}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{os.path.basename(path)}:{cell['id']}", "exec"), namespace)


def test_there_are_notebooks():
    assert NOTEBOOKS
