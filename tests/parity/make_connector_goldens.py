"""Golden values for ReviewKD's attention-based fusion (ABF) review path, from a PyTorch peer.

Run by hand with the peer venv (see make_loss_goldens.py), from the repo root:

    /work/peer-venv/bin/python tests/parity/make_connector_goldens.py

Other inputs: `--seed N --out DIR/connectors` draws the shapes and values afresh, and
`TRANSFERLAB_PARITY_DATA=DIR pytest tests/test_connector_parity.py` checks against them.

torchdistill has no ABF module, so the peer is a PyTorch module written here from
ReviewKD (arXiv:2104.09044, Sec. 3.3) and our reading of the authors' code
(github.com/dvlab-research/ReviewKD, CIFAR-100/model/reviewkd.py): per level,
x -> BN(conv1x1(x)); with a deeper residual r (nearest-upsampled to x's size),
z = sigmoid(conv1x1([x, r])), x = x * z0 + r * z1; x nearest-resized to the
teacher's size; out = BN(conv3x3(x)); levels fused deepest first, mid channels =
min(512, deepest width). BatchNorm in training mode (batch statistics).

Writes tests/parity/data/connectors/abf.npz: NHWC float32 student features
`student_<i>` (shallow to deep; the deepest is a pooled [B, C] vector, as in the
reference), `teacher_shape_<i>`, the weights under flax names (`param:abf<i>/conv1/kernel`,
HWIO), the cotangents `cot_<i>` (NHWC), and the peer's outputs `out_<i>`, input
gradients `grad_<i>` and weight gradients `gparam:<name>` of sum_i <out_i, cot_i>.
The peer runs in float64.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "connectors")
torch.set_default_dtype(torch.float64)


class PeerABF(nn.Module):
    def __init__(self, in_channels, mid_channels, out_channels, fuse):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.att_conv = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None

    def forward(self, x, residual, out_hw):
        x = self.bn1(self.conv1(x))
        if self.att_conv is not None:
            r = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            z = torch.sigmoid(self.att_conv(torch.cat([x, r], dim=1)))
            x = x * z[:, 0:1] + r * z[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_hw):
            x = F.interpolate(x, size=tuple(out_hw), mode="nearest")
        return self.bn2(self.conv2(x)), x


def level_shapes(seed):
    """(student shapes, teacher shapes), shallow -> deep, NHWC or pooled [B, C].

    Seed 0: the committed golden (3 levels, the deepest pooled). Other seeds draw the batch
    (2-6), the number of levels (1-4), each level's student map (halving with depth from 4-9
    pixels, at least 1) and the teacher's (the student's size, 2x, or any 1-10: nearest
    resizing at non-integer ratios too), channels 1-16, and whether the deepest level is pooled.
    """
    if seed == 0:
        batch = 4
        return ([(batch, 4, 4, 8), (batch, 2, 2, 12), (batch, 16)],
                [(batch, 8, 8, 10), (batch, 4, 4, 14), (batch, 20)])
    r = np.random.default_rng((2104_09044, seed))
    batch, n = int(r.integers(2, 7)), int(r.integers(1, 5))
    hw = int(r.integers(4, 10))
    s_shapes, t_shapes = [], []
    for i in range(n):
        s_hw = max(1, hw >> i)
        t_hw = int(r.choice([s_hw, 2 * s_hw, int(r.integers(1, 11))]))
        s_c, t_c = int(r.integers(1, 17)), int(r.integers(1, 17))
        if i == n - 1 and r.random() < 0.5:  # a pooled deepest level, as the reference's
            s_shapes.append((batch, s_c))
            t_shapes.append((batch, t_c))
        else:
            s_shapes.append((batch, s_hw, s_hw, s_c))
            t_shapes.append((batch, t_hw, t_hw, t_c))
    return s_shapes, t_shapes


def main():
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="0: the committed golden; others draw shapes and values")
    p.add_argument("--out", default=OUT, help="directory for abf.npz")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(2104_09044 if args.seed == 0 else (2104_09044, args.seed, 1))
    s_shapes, t_shapes = level_shapes(args.seed)
    mid = min(512, s_shapes[-1][-1])
    n = len(s_shapes)
    blocks = [PeerABF(s[-1], mid, t[-1], fuse=i < n - 1) for i, (s, t) in enumerate(zip(s_shapes, t_shapes))]
    arrays = {}
    named = {}  # flax name -> (torch parameter, "conv"/"vector")
    for i, block in enumerate(blocks):
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.copy_(torch.tensor(rng.standard_normal(tuple(p.shape)) * (0.5 if p.ndim == 4 else 0.3)
                                     + (1.0 if name.endswith("weight") and p.ndim == 1 else 0.0)))
        named[f"abf{i}/conv1/kernel"] = block.conv1.weight
        named[f"abf{i}/bn1/scale"] = block.bn1.weight
        named[f"abf{i}/bn1/bias"] = block.bn1.bias
        named[f"abf{i}/conv2/kernel"] = block.conv2.weight
        named[f"abf{i}/bn2/scale"] = block.bn2.weight
        named[f"abf{i}/bn2/bias"] = block.bn2.bias
        if block.att_conv is not None:
            named[f"abf{i}/att_conv/kernel"] = block.att_conv.weight
            named[f"abf{i}/att_conv/bias"] = block.att_conv.bias
        block.train()

    def to_flax(p):
        a = p.detach().numpy()
        return (a.transpose(2, 3, 1, 0) if a.ndim == 4 else a).astype(np.float32)

    feats = [rng.standard_normal(s).astype(np.float32) for s in s_shapes]
    xs = []
    for f in feats:
        x = torch.tensor(f.transpose(0, 3, 1, 2) if f.ndim == 4 else f[:, :, None, None], dtype=torch.float64,
                         requires_grad=True)
        xs.append(x)
    outs = [None] * n
    residual = None
    for i in reversed(range(n)):
        t = t_shapes[i]
        out_hw = t[1:3] if len(t) == 4 else (1, 1)
        outs[i], residual = blocks[i](xs[i], residual, out_hw)
    cots = [rng.standard_normal(t).astype(np.float32) for t in t_shapes]
    total = 0.0
    for o, c in zip(outs, cots):
        c_t = torch.tensor(c.transpose(0, 3, 1, 2) if c.ndim == 4 else c[:, :, None, None], dtype=torch.float64)
        total = total + (o * c_t).sum()
    total.backward()

    for i in range(n):
        arrays[f"student_{i}"] = feats[i]
        arrays[f"teacher_shape_{i}"] = np.asarray(t_shapes[i], np.int64)
        arrays[f"cot_{i}"] = cots[i]
        o = outs[i].detach().numpy()
        arrays[f"out_{i}"] = (o.transpose(0, 2, 3, 1) if len(t_shapes[i]) == 4 else o[:, :, 0, 0]).astype(np.float32)
        g = xs[i].grad.numpy()
        arrays[f"grad_{i}"] = (g.transpose(0, 2, 3, 1) if feats[i].ndim == 4 else g[:, :, 0, 0]).astype(np.float32)
    for name, p in named.items():
        arrays[f"param:{name}"] = to_flax(p)
        arrays[f"gparam:{name}"] = to_flax(p.grad)
    np.savez(os.path.join(args.out, "abf.npz"), peer="PyTorch ABF review path (ReviewKD reference structure), float64",
             **arrays)
    print(f"abf: {n} levels, total <out, cot> = {total.item():.8g}")


if __name__ == "__main__":
    main()
