"""CIFAR-100 benchmark row resnet110 (teacher) -> resnet32 (student).

The standard CIFAR-100 KD table of RepDistiller (CRD, arXiv:1910.10699) and
mdistiller (DKD, arXiv:2203.08679). `method=NAME` picks the distillation method
(default `kd`: Hinton et al., arXiv:1503.02531); every preset, its
hyper-parameters and its paper are listed in `transferlab/methods.py`. Recipe
(`transferlab.methods.cifar100_recipe`): 240 epochs at batch 64, SGD lr 0.05,
momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 150/180/210, pad-4 crop +
flip. Selection: the last step, as the published tables; the periodic
evaluation reads the test split (CIFAR-100 has no validation split) for
monitoring only, never for selection.

Needs CIFAR-100 prepared as a tfds ArrayRecord dataset under $TFDS_DATA_DIR
(`tfds build cifar100 --file_format=array_record` on a machine with network).
Train the teacher, then the student from its workdir (`teacher_ckpt`, default
runs/cifar100/resnet110):

  python -m transferlab.main --config experiments/kd/cifar100/teacher.py:model=resnet110 --workdir runs/cifar100/resnet110
  python -m transferlab.main --config experiments/kd/cifar100/resnet110_resnet32.py:method=dkd,teacher_ckpt=runs/cifar100/resnet110 \
      --workdir runs/cifar100/resnet110_resnet32/dkd
"""

from transferlab.methods import cifar100_config


def get_config(arg=None):
    return cifar100_config("resnet110", "resnet32", arg)
