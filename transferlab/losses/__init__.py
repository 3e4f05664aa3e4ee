"""Distillation losses: pure functions of arrays, registered by name.

    from transferlab import losses
    spec = losses.get("kd")
    hp = losses.resolve_hparams("kd", {"temperature": 4.0})
    value = spec.fn(student_logits, teacher_logits, batch, **hp)   # float32 scalar

`student` / `teacher` are taps (logits [B, C], pooled features [B, D], NHWC maps
[B, H, W, C]; lists of them when `spec.multi_tap`); `batch` holds `label` int32 [B]
and optionally `mask` bool [B] (masked samples are left out of every mean).
Modules: `logit` (kd, dkd, dist, kd_std, cwtm, dkpp, class_relation, trilateral),
`feature` (fitnet, at, nd, reviewkd), `relation` (sp, rkd, pkt, trg, crd),
`connectors` (student-to-teacher shape mappers). Golden values against
torchdistill / reference formulas: tests/parity/README.md. A config file can add its own loss with
`@losses.register(name, taps=(student_tap, teacher_tap))` (see `registry.register`).
"""

from transferlab.losses import connectors, feature, logit, relation
from transferlab.losses.registry import LossSpec, get, names, register, resolve_hparams
from transferlab.losses.relation import (crd_init_memory, crd_normalizers, crd_sample_indices,
                                         crd_update_memory)

__all__ = ["LossSpec", "get", "names", "register", "resolve_hparams", "connectors", "logit", "feature", "relation",
           "crd_update_memory", "crd_sample_indices", "crd_init_memory", "crd_normalizers"]
