"""KD method presets and the shared CIFAR-100 training recipe.

`distill_section(method, **overrides)` returns the `distill` section of a config,
`{'ce_weight': ..., 'terms': (...)}`, for every KD method the KD task can train,
with the hyper-parameters of the standard CIFAR-100 benchmark. `METHODS` maps
each name to its preset function; `cifar100_recipe(teacher, student, method,
teacher_ckpt)` is the whole training recipe of `experiments/kd/cifar100/`.

Where each recipe comes from. "RepDistiller" is github.com/HobbitLong/RepDistiller
(`scripts/run_cifar_distill.sh`: -r CE weight, -a KD weight, -b method weight;
every feature method there runs with -a 0, i.e. without a KD term) and
"mdistiller" is github.com/megvii-research/mdistiller (`mdistiller/engine/cfg.py`
and `configs/cifar100/`). T is the temperature.

  method          CE    terms                                          source
  kd              0.1   kd 0.9, T=4                                    Hinton et al. arXiv:1503.02531; RepDistiller -r 0.1 -a 0.9, mdistiller KD
  dkd             1.0   dkd 1, alpha=1, beta=8 (per pair), T=4,        arXiv:2203.08679; mdistiller DKD (beta 2 for resnet56/110
                        linear warm-up over 20 of 240 epochs             students' pairs, 6 for wrn/vgg pairs, else 8: `DKD_BETA`)
  dist            1.0   dist 1, beta=gamma=2, tau=4                    arXiv:2205.10536, the paper's CIFAR-100 setting as we read it
                                                                         (not in mdistiller; the ND authors' DIST++ code uses
                                                                         beta=gamma=1, tau=4 with loss weights 1.5-7 per pair)
  kd_std          0.1   kd_std 9, T=2                                  logit standardization on KD, arXiv:2403.01427
                                                                         (authors' mdistiller fork: --logit-stand --base-temp 2 --kd-weight 9)
  dkd_std         1.0   dkd 1 on z-scored logits (`standardize_logits`),  DKD + logit standardization, arXiv:2403.01427 (our choice: DKD's
                        alpha=1, beta per pair, T=2, DKD's warm-up       weights and warm-up, LS's base temperature 2; the paper's
                                                                         DKD+LS settings are not checked)
  fitnet          1.0   fitnet 100 on stage2 (conv1x1+BN regressor)    arXiv:1412.6550; RepDistiller -a 0 -b 100 (hint_layer 2), mdistiller
  at              1.0   at 1 with beta=1000, p=2, stages 1-3           arXiv:1612.03928; RepDistiller -a 0 -b 1000, mdistiller
  sp              1.0   sp 3000 on stage3                              arXiv:1907.09682; RepDistiller -a 0 -b 3000, mdistiller
  rkd             1.0   rkd 1, w_dist=25, w_angle=50 on pooled feats   arXiv:1904.05068; RepDistiller -a 0 -b 1, mdistiller
  pkt             1.0   pkt 30000 on pooled features                   arXiv:1803.10837; RepDistiller -a 0 -b 30000, mdistiller
  crd             1.0   crd 0.8, 128-d embeddings, 16384 negatives,    arXiv:1910.10699; RepDistiller -a 0 -b 0.8, mdistiller
                        T=0.07, memory momentum 0.5                      (CRD+KD of RepDistiller: kd_weight=1)
  nd              1.0   kd 1 (T=4, warm-up 20 epochs) + nd 2           arXiv:2305.17007 "KD++"; the authors' CIFAR script
                                                                         (resnet56->resnet20 weights; other pairs use kd 1-4, nd 0.5-2).
                                                                         nd's class means are the teacher's over the train
                                                                         split, computed once before training (as the paper)
  reviewkd        1.0   reviewkd 1 (5 for resnet32x4->resnet8x4),      arXiv:2104.09044; mdistiller REVIEWKD (cfg.py and
                        warm-up 20 epochs                                configs/cifar100/reviewkd.yaml)
  cwtm            0.0   cwtm 1                                         born-again networks, arXiv:1805.04770 (the CWTM loss
  dkpp            0.0   dkpp 1, T=1                                    and the DKPP loss replace the label CE)
  class_relation  0.1   class_relation 0.9, T=4                        arXiv:2307.09158 (a novel-class-discovery loss; no CIFAR-100
                                                                         KD recipe exists. With teacher and student over the same
                                                                         classes its weight is 1 and it equals KD, so it takes KD's
                                                                         weights: its row should match KD's)
  trg             1.0   trg 1, tau=0.1, stage3 tokens                  arXiv:2306.12442 (no public recipe or peer code: the loss's
                                                                         defaults, unchecked). On the ShuffleNet rows (stage3 4x4
                                                                         vs 8x8) the teacher map is average-pooled to 4x4 first
  trilateral      0.0   trilateral 1, T=4 (holds the CE itself)        TGeo-KD, arXiv:2312.15112 (no recipe we could check; the ratio network
                                                                         learns by the KD task's one-step look-ahead, stepped on one
                                                                         half of the training batch and scored on the other,
                                                                         `distill.trilateral_outer`; the paper scores it on a
                                                                         validation split)

`kd_std` is KD+LS (the `kd_std` loss); `dkd_std` is DKD+LS, the `dkd` term with
`standardize_logits=True` (any logit term can z-score its logits that way).
`dist` follows the authors' code (`+ eps` in the Pearson denominator); torchdistill's
`DISTLoss` clamps the norms instead: `eps_mode='clamp'` matches it.

`warmup_steps` (an int, steps) is the length of the linear warm-up of the terms
the sources warm up (dkd, reviewkd, nd's kd); `cifar100_recipe` sets it to 20 of
240 epochs. Overrides of `distill_section`: `warmup_steps` and the other keyword
arguments of the preset (`beta` of dkd, `weight` of reviewkd), `ce_weight`, and
`kd_weight` (adds a Hinton KD term at T=4 with that weight, or reweights the
method's own, as RepDistiller's "+KD" rows).
"""

from __future__ import annotations

import inspect

import ml_collections

from transferlab.config import parse_arg
from transferlab.errors import ConfigError, unknown_name

KD_TEMPERATURE = 4.0


def _term(name, weight, **hparams):
    return {"name": name, "weight": float(weight), **hparams}


def _warm(term, warmup_steps):
    return {**term, "warmup_steps": int(warmup_steps)} if warmup_steps else term


def _kd_term(weight, warmup_steps=0):
    return _warm(_term("kd", weight, temperature=KD_TEMPERATURE), warmup_steps)


def kd(warmup_steps=0):
    return {"ce_weight": 0.1, "terms": (_kd_term(0.9),)}


def dkd(warmup_steps=0, beta=8.0):
    term = _term("dkd", 1.0, alpha=1.0, beta=float(beta), temperature=KD_TEMPERATURE)
    return {"ce_weight": 1.0, "terms": (_warm(term, warmup_steps),)}


def dist(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("dist", 1.0, beta=2.0, gamma=2.0, tau=4.0),)}


def kd_std(warmup_steps=0):
    return {"ce_weight": 0.1, "terms": (_term("kd_std", 9.0, temperature=2.0),)}


def dkd_std(warmup_steps=0, beta=8.0):
    term = _term("dkd", 1.0, alpha=1.0, beta=float(beta), temperature=2.0, standardize_logits=True)
    return {"ce_weight": 1.0, "terms": (_warm(term, warmup_steps),)}


def fitnet(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("fitnet", 100.0, student_tap="stage2", teacher_tap="stage2"),)}


def at(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("at", 1.0, beta=1000.0, p=2.0),)}


def sp(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("sp", 3000.0),)}


def rkd(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("rkd", 1.0, w_dist=25.0, w_angle=50.0),)}


def pkt(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("pkt", 30000.0),)}


def crd(warmup_steps=0):
    term = _term("crd", 0.8, temperature=0.07, embed_dim=128, num_negatives=16384, memory_momentum=0.5)
    return {"ce_weight": 1.0, "terms": (term,)}


def nd(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_kd_term(1.0, warmup_steps), _term("nd", 2.0))}


def reviewkd(warmup_steps=0, weight=1.0):
    return {"ce_weight": 1.0, "terms": (_warm(_term("reviewkd", weight), warmup_steps),)}


def cwtm(warmup_steps=0):
    return {"ce_weight": 0.0, "terms": (_term("cwtm", 1.0),)}


def dkpp(warmup_steps=0):
    return {"ce_weight": 0.0, "terms": (_term("dkpp", 1.0, temperature=1.0),)}


def class_relation(warmup_steps=0):
    return {"ce_weight": 0.1, "terms": (_term("class_relation", 0.9, temperature=KD_TEMPERATURE),)}


def trilateral(warmup_steps=0):
    return {"ce_weight": 0.0, "terms": (_term("trilateral", 1.0, temperature=KD_TEMPERATURE),)}


def trg(warmup_steps=0):
    return {"ce_weight": 1.0, "terms": (_term("trg", 1.0, tau=0.1),)}


METHODS = {
    "kd": kd, "dkd": dkd, "dist": dist, "kd_std": kd_std, "dkd_std": dkd_std, "fitnet": fitnet, "at": at, "sp": sp, "rkd": rkd,
    "pkt": pkt, "crd": crd, "nd": nd, "reviewkd": reviewkd, "cwtm": cwtm, "dkpp": dkpp,
    "class_relation": class_relation, "trg": trg, "trilateral": trilateral,
}


def distill_section(method: str, **overrides) -> dict:
    """`{'ce_weight': ..., 'terms': (...)}` of `method` (see the module docstring for the overrides)."""
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    preset = METHODS[method]
    ce_weight = overrides.pop("ce_weight", None)
    kd_weight = overrides.pop("kd_weight", None)
    allowed = inspect.signature(preset).parameters
    for key in overrides:
        if key not in allowed:
            raise ConfigError(f"method {method!r}: unknown override {key!r}; allowed: "
                              f"{', '.join(['ce_weight', 'kd_weight', *allowed])}")
    section = preset(**overrides)
    if ce_weight is not None:
        section["ce_weight"] = float(ce_weight)
    if kd_weight is not None:
        others = tuple(t for t in section["terms"] if t["name"] != "kd")
        section["terms"] = others + ((_kd_term(kd_weight),) if kd_weight else ())
    return section


# --------------------------------------------------------------------------- CIFAR-100 recipe

CIFAR100_TRAIN_SIZE = 50000
EPOCHS = 240
BATCH_SIZE = 64
TOTAL_STEPS = EPOCHS * CIFAR100_TRAIN_SIZE // BATCH_SIZE  # 187,500
LIGHT_MODELS = ("mobilenetv2", "mobile_half", "shufflenetv1", "shufflenetv2")  # lr 0.01 (RepDistiller)
# mdistiller configs/cifar100/dkd/*.yaml: DKD beta per (teacher, student); 8 elsewhere.
DKD_BETA = {("resnet56", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0, ("wrn_40_2", "wrn_16_2"): 6.0,
            ("wrn_40_2", "wrn_40_1"): 6.0, ("vgg13", "vgg8"): 6.0, ("vgg13", "mobilenetv2"): 6.0}
# mdistiller configs/cifar100/reviewkd.yaml (resnet32x4 -> resnet8x4); 1.0 elsewhere (cfg.py).
REVIEWKD_WEIGHT = {("resnet32x4", "resnet8x4"): 5.0}


def epochs_to_steps(epochs: float) -> int:
    """Steps of `epochs` CIFAR-100 epochs at batch 64 (781.25 steps per epoch)."""
    return int(epochs * TOTAL_STEPS // EPOCHS)


def cifar100_base(model: str) -> ml_collections.ConfigDict:
    """The CIFAR-100 recipe of RepDistiller / mdistiller for training `model` from labels.

    240 epochs at batch 64, SGD momentum 0.9, L2 5e-4 on every parameter (as
    PyTorch's SGD weight_decay, BN and biases included), lr 0.05 (0.01 for
    MobileNetV2 / ShuffleNets) decayed x0.1 at epochs 150, 180, 210; pad-4 random
    crop and horizontal flip. Selection: the last step, as the published tables.
    Periodic evaluation runs on the test split (CIFAR-100 has no validation
    split); this is monitoring only, because with selection 'last' no checkpoint
    is ever chosen by it.
    """
    c = ml_collections.ConfigDict()
    c.task = "classify"
    c.total_steps = TOTAL_STEPS
    c.batch_size = BATCH_SIZE
    c.eval_batch_size = 256
    c.log_every_steps = 100
    c.eval_every_steps = epochs_to_steps(10)
    c.checkpoint_every_steps = epochs_to_steps(10)
    c.selection = "last"
    c.dataset = {"name": "cifar100", "train_split": "train", "eval_split": "test", "test_split": "test"}
    c.augment = {"crop_padding": 4, "flip": True}
    c.model = {"name": model}
    c.optimizer = {"name": "sgd", "learning_rate": 0.01 if model in LIGHT_MODELS else 0.05, "momentum": 0.9,
                   "weight_decay": 5e-4, "decay_norms_and_biases": True}
    c.schedule = {"name": "step", "boundaries": tuple(e / EPOCHS for e in (150, 180, 210)), "decay_factor": 0.1}
    return c


def pair_overrides(method: str, teacher: str, student: str) -> dict:
    """Per-(teacher, student) hyper-parameters of the sources (DKD's beta, ReviewKD's weight)."""
    if method in ("dkd", "dkd_std"):
        return {"beta": DKD_BETA.get((teacher, student), 8.0)}
    if method == "reviewkd":
        return {"weight": REVIEWKD_WEIGHT.get((teacher, student), 1.0)}
    return {}


def cifar100_recipe(teacher: str, student: str, method: str = "kd",
                    teacher_ckpt: str = "") -> ml_collections.ConfigDict:
    """`student` distilled from a trained `teacher` (its workdir `teacher_ckpt`) with `method` on CIFAR-100.

    `cifar100_base(student)` plus the method's `distill_section`; the warm-up of
    DKD / ReviewKD / ND's KD lasts 20 of the 240 epochs (mdistiller). An empty
    `teacher_ckpt` means `runs/cifar100/<teacher>`, the workdir the teacher
    config's docstring uses.
    """
    c = cifar100_base(student)
    c.task = "kd"
    c.teacher = {"name": teacher, "checkpoint": teacher_ckpt or f"runs/cifar100/{teacher}"}
    warmup = epochs_to_steps(20)
    c.distill = distill_section(method, warmup_steps=warmup, **pair_overrides(method, teacher, student))
    return c


def cifar100_config(teacher: str, student: str, arg: str | None) -> ml_collections.ConfigDict:
    """`cifar100_recipe` from a config-file argument 'method=NAME,teacher_ckpt=PATH' (both optional)."""
    args = parse_arg(arg)
    unknown = set(args) - {"method", "teacher_ckpt"}
    if unknown:
        raise ConfigError(f"config argument {sorted(unknown)[0]!r}: expected method=NAME and/or teacher_ckpt=PATH")
    return cifar100_recipe(teacher, student, args.get("method", "kd"), args.get("teacher_ckpt", ""))
