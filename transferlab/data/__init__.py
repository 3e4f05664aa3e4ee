"""Data: offline tfds builders, name -> source, grain pipelines, JAX batch augmentations.

    from transferlab import data
    info = data.dataset_info("mnist5k")
    it = data.train_iterator("mnist5k", "train", global_batch_size=128, seed=0)
    batch = next(it)          # {'image' f32 [b,H,W,C], 'label' i32 [b], 'index' i32 [b]}
    state = it.get_state()    # JSON-serializable dict; it.set_state(state) resumes
    for batch in data.eval_batches("mnist5k", "test", 256):  # + 'mask' bool [b]
        ...
"""

from transferlab.data import augment
from transferlab.data.builders import OFFLINE_BUILDERS, SPLIT_SEED, resolve_data_dir
from transferlab.data.pipeline import (
    eval_batches,
    num_eval_batches,
    steps_per_epoch,
    train_iterator,
)
from transferlab.data.sources import (
    DatasetInfo,
    base_name,
    dataset_info,
    get_builder,
    get_source,
    offline_names,
    shared_examples,
    split_names,
    split_size,
)
