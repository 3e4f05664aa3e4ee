"""Test setup: 8 simulated CPU devices, strict rank promotion, a shared offline data dir."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_experimental_ynn_fusion_type="
                           # LLVM -O0: halves compile time, which dominates these tiny tests (same HLO, same math)
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir():
    """The offline datasets, prepared once per machine (concurrent workers are safe)."""
    return os.environ["TFDS_DATA_DIR"]


# The longest tests (each 20-65 s on 2 cores), started first so that no worker is left running one
# of them alone at the end of `pytest -n auto` (xdist hands tests out in collection order).
SLOW_FIRST = (
    "test_experiments.py::test_kd_table_runs_through_the_cli",
    "test_train.py::test_quickstart_study_end_to_end",
    "test_experiments.py::test_every_method_trains_in_one_step",
    "test_experiments.py::test_cifar100_row_compiles_and_trains_two_steps",
    "test_schemes.py::test_hard_augmentor_is_pushed_to_hurt_the_student_and_keep_the_teacher",
    "test_multiprocess.py::test_two_processes_train_and_resume",
    "test_notebooks.py::test_notebook_runs",
    "test_train.py::test_unreadable_checkpoint_is_a_clear_error_naming_the_earlier_one",
    "test_schemes.py::test_born_again_generations_and_their_ensemble",
    "test_experiments.py::test_every_method_traces_on_every_cifar100_row",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        for i, prefix in enumerate(SLOW_FIRST):
            if item.nodeid.split("tests/")[-1].startswith(prefix):
                return i
        return len(SLOW_FIRST)
    items.sort(key=rank)  # stable: the rest keep their order
