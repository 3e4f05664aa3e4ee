"""KD train-step throughput and memory: transferlab (JAX, CPU) vs torchdistill (PyTorch, CPU).

For each teacher -> student pair (CIFAR shapes: 32x32x3 inputs, 100 classes) it times

    kd       one full train step: teacher forward (frozen, eval mode) + student
             forward/backward + SGD update; loss 0.1 * CE + 0.9 * Hinton KD (T = 4)
    student  the student's plain supervised step (CE only) with the same optimizer
    teacher  the teacher's forward pass alone (eval mode, no gradient)

on both sides, and checks the target  kd <= student + 1.05 * teacher.

transferlab side: the library's own jitted step (`Trainer.jit_train_step`, built from
a config with `teacher.checkpoint='random'` and dataset info given, so no data or
trained teacher is needed); the teacher forward is `jax.jit(teacher.apply)` on the
frozen variables. torch side: `bench/torch_models.py` (same architectures, parameter
counts checked equal), torchdistill's `KDLoss` (alpha=0.1, beta=0.9, T=4: returns
0.1 * CE + 0.9 * T^2 * KL(batchmean), which is exactly transferlab's
`ce_weight * CE + weight * kd` with kd = T^2 * KL(batchmean)), SGD momentum 0.9,
weight decay 5e-4 on every parameter (transferlab is configured with
`decay_norms_and_biases=True` to match), `torch.set_num_threads(2)`.

Every measurement runs in its own subprocess, so the peak RSS (`resource.getrusage`)
is that of one program on one side only; JAX and torch never share a process.
JAX variants: XLA flags (YNNPACK fusion off vs XLA's default), the native CPU conv kernels
(`xla_conv`: off) and the residual-block `fusion_barrier` model kwarg (off vs on).

Host allocator (`--allocators`, CPU): every figure on both sides is measured with glibc's
malloc ("system", torch's default) and with mimalloc preloaded ("mimalloc", what
`python -m transferlab.main` uses on a CPU host: `transferlab/host_allocator.py`). Each
transferlab row's ratios are against the torch row with the same allocator; the column
"vs torch glibc" compares it with torchdistill as it runs by default. A worker checks that
the allocator it was given is the one loaded (`/proc/self/maps`).

    .venv-bench/bin/python bench/kd_step.py                      # both pairs, all variants
    .venv-bench/bin/python bench/kd_step.py --pairs resnet32x4:resnet8x4 --iters 5
    .venv-bench/bin/python bench/kd_step.py --variants ynn_off --fusion-barrier on
    python bench/kd_step.py --device gpu --variants default --wait-idle 0 --iters 50  # one CUDA GPU

With `--device gpu` both sides run on the first CUDA GPU: JAX with `JAX_PLATFORMS=cuda`,
torch with `.cuda()` models and inputs, `cudnn.benchmark = True` (the peer's fastest
setting; XLA autotunes its convolutions anyway) and a `torch.cuda.synchronize()` ending
each timed call. Both use their default float32 convolution precision (TF32 on Ampere
and later). The memory table then also gives each side's peak GPU memory.

Timing: `--warmup` untimed calls (the first is reported as the compile/first-call
time), then the median of `--iters` calls, each ended by `block_until_ready` (JAX)
or by the synchronous return of `optimizer.step()` (torch). Each figure is measured
in `--repeats` fresh processes (default 3) and the process with the median time is
reported (per-process medians are printed in the progress lines): the same JAX
program runs up to ~15% faster or slower from one process to the next here.
Each loss's step overhead over plain KD: `bench/loss_overhead.py`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)  # transferlab, also when it is not installed
from transferlab.provenance import cpu_name as _cpu_name, git_commit as _git_commit  # noqa: E402
from transferlab.provenance import host_allocator as _loaded_allocator  # noqa: E402

NUM_CLASSES = 100
IMAGE_SHAPE = (32, 32, 3)
TEMPERATURE = 4.0
CE_WEIGHT, KD_WEIGHT = 0.1, 0.9
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
TARGET_TEACHER_FACTOR = 1.05
# XLA_FLAGS per JAX variant. YNNPACK fusions off measured 10-25% faster on this 2-core CPU. 'xla_conv': the
# library's flags with its native CPU conv kernels off (TRANSFERLAB_NATIVE_KERNELS=0: every convolution XLA's;
# transferlab/models/native_conv.py), the others run them where they apply (one CPU device, as here).
VARIANTS = {"ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
            "xla_conv": "--xla_cpu_experimental_ynn_fusion_type=", "default": ""}
# The house peer figure for resnet56 -> resnet20 (torchdistill, seconds per step, this machine class).
HOUSE_PEER = {"resnet56:resnet20": {"kd": 0.27, "student": 0.18, "teacher": 0.175}}
WHATS = ("kd", "student", "teacher")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores; /proc/stat), or 0 if unreadable."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _time_calls(fn, warmup: int, iters: int) -> dict:
    """First-call seconds, then the median and min of `iters` calls after `warmup` calls in all.

    `cpu_median_s` is this process's CPU time per call (all threads; about 2x the wall time
    when both cores are kept busy). Also the share of the machine's CPUs busy with *other* processes during the timed calls
    ('other_load', 0..1): the dev machine is shared, so a figure taken under load says so;
    and the minor page faults per timed call (fresh pages the allocator mapped).
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    times, cpu_times = [], []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    busy0, own0, wall0 = _cpu_busy_s(), _own_cpu_s(), time.perf_counter()
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    wall = time.perf_counter() - wall0
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / max(iters, 1)
    other = max(0.0, (_cpu_busy_s() - busy0) - (_own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))
    return {"first_s": first, "median_s": statistics.median(times), "min_s": min(times),
            "cpu_median_s": statistics.median(cpu_times), "other_load": round(other, 3),
            "page_faults_per_call": round(faults, 1), "allocator": _loaded_allocator()}


def _allocator_env(env: dict, allocator: str) -> dict:
    """`env` with mimalloc preloaded (allocator 'mimalloc') or with no mimalloc preload ('system')."""
    from transferlab import host_allocator

    env = dict(env)
    kept = [p for p in host_allocator.preload_entries(env) if not host_allocator.is_mimalloc(p)]
    if allocator == "mimalloc":
        library = host_allocator.mimalloc_path()
        if library is None:
            raise SystemExit("kd_step: --allocators mimalloc: the cmeel-mimalloc package is not installed here")
        kept.insert(0, library)
    env[host_allocator.CHOICE_ENV] = allocator
    if kept:
        env["LD_PRELOAD"] = " ".join(kept)
    else:
        env.pop("LD_PRELOAD", None)
    return env


# --------------------------------------------------------------------------- JAX worker


def jax_step(pair: str, what: str, batch_size: int, fusion_barrier: str = "n/a", distill=None):
    """transferlab's jitted `what` ('kd', 'student' or 'teacher') for `pair` on CIFAR-100 shapes.

    Returns (fn, student_or_teacher_params, box): `fn()` runs one step and blocks;
    `box['metrics']` holds the last step's metrics. `distill` replaces the KD section
    (default: 0.1 * CE + 0.9 * KD at T = 4). Needs no data set and no trained teacher
    (`teacher.checkpoint='random'`). Returns (None, error message, None) when a model
    takes no `fusion_barrier` kwarg.
    """
    import jax
    import numpy as np

    from transferlab import config as config_lib, models, parallel
    from transferlab.errors import ConfigError
    from transferlab.train import Trainer
    from types import SimpleNamespace

    teacher, student = pair.split(":")

    def model_kwargs(name):
        if fusion_barrier == "n/a":
            return {}
        kwargs = {"fusion_barrier": fusion_barrier == "on"}
        try:
            models.create(name, num_classes=NUM_CLASSES, **kwargs)
        except ConfigError:
            return None  # the model has no such kwarg
        return kwargs

    s_kwargs, t_kwargs = model_kwargs(student), model_kwargs(teacher)
    if s_kwargs is None or t_kwargs is None:
        return None, f"models {pair} take no 'fusion_barrier' kwarg", None
    base = {
        "batch_size": batch_size, "mesh_shape": "data=1", "total_steps": 1000, "seed": 0,
        "model": {"name": student, "kwargs": s_kwargs},
        "optimizer": {"name": "sgd", "learning_rate": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY,
                      "decay_norms_and_biases": True},
        "schedule": {"name": "constant"},
    }
    if what == "student":
        cfg = config_lib.from_dict({**base, "task": "classify"})
    else:
        if distill is None:
            distill = {"ce_weight": CE_WEIGHT,
                       "terms": ({"name": "kd", "weight": KD_WEIGHT, "temperature": TEMPERATURE},)}
        cfg = config_lib.from_dict({
            **base, "task": "kd", "teacher": {"name": teacher, "checkpoint": "random", "kwargs": t_kwargs},
            "distill": distill})
    # CIFAR-100's dataset info, given to the Trainer so that no data set is needed.
    fields = {"name": "cifar100", "num_classes": NUM_CLASSES, "image_shape": IMAGE_SHAPE,
              "split_sizes": {"train": 50000, "validation": 0, "test": 10000},
              "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762)}
    try:
        from transferlab.data import DatasetInfo
        info = DatasetInfo(**fields)
    except (ImportError, TypeError):  # an older/newer DatasetInfo: duck-type it
        info = SimpleNamespace(**fields, splits=fields["split_sizes"])
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, *IMAGE_SHAPE), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)

    workdir = tempfile.mkdtemp(prefix="kd_bench_")  # never written: no checkpoints are saved
    trainer = Trainer(cfg, workdir=workdir, devices=jax.devices()[:1], info=info)
    frozen = trainer.task.load_frozen(trainer.mesh, trainer.abstract_images)
    box = {}
    if what == "teacher":
        # The (first) teacher's module and frozen variables, as the KD task holds them.
        teacher_model = (trainer.task.teachers[0] if hasattr(trainer.task, "teachers")
                         else trainer.task.teacher)
        teacher_vars = frozen["teachers"][0] if "teachers" in frozen else frozen
        variables = {"params": teacher_vars["params"], **teacher_vars["model_state"]}
        x = parallel.global_batch(trainer.mesh, {"image": images})["image"]
        forward = jax.jit(lambda v, x: teacher_model.apply(v, x, train=False))
        return (lambda: forward(variables, x).block_until_ready()), variables["params"], box
    trainer.compile(frozen)
    box["state"] = trainer.init_state()
    batch = parallel.global_batch(trainer.mesh, {"image": images, "label": labels,
                                                 "index": np.arange(batch_size, dtype=np.int32)})

    def fn():
        box["state"], metrics = trainer.jit_train_step(box["state"], frozen, batch)
        jax.block_until_ready((box["state"], metrics))
        box["metrics"] = metrics
    return fn, box["state"]["params"]["model"], box


def _jax_worker(args) -> dict:
    import jax
    import numpy as np

    rss_after_import = _peak_rss_mib()
    fn, params, box = jax_step(args.pair, args.what, args.batch, args.fusion_barrier)
    if fn is None:
        return {"error": params}
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    timing = _time_calls(fn, args.warmup, args.iters)
    extra = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        extra["peak_device_mib"] = stats["peak_bytes_in_use"] / 2**20
    if "metrics" in box:
        extra["loss"] = float(box["metrics"].get("loss/total", box["metrics"].get("loss/ce")))
    return {**timing, "peak_rss_mib": _peak_rss_mib(),
            "rss_after_import_mib": rss_after_import, "params": n_params, **extra}


# --------------------------------------------------------------------------- torch worker


def _torch_worker(args) -> dict:
    import torch
    from torchdistill.losses.mid_level import KDLoss

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch_models

    gpu = args.device == "gpu"
    if gpu:
        torch.backends.cudnn.benchmark = True
        sync = torch.cuda.synchronize
    else:
        torch.set_num_threads(2)
        sync = lambda: None  # noqa: E731  (CPU ops return when done)
    device = "cuda" if gpu else "cpu"
    torch.manual_seed(0)
    rss_after_import = _peak_rss_mib()
    teacher_name, student_name = args.pair.split(":")
    x = torch.randn(args.batch, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2]).to(device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,)).to(device)
    student = torch_models.create(student_name, NUM_CLASSES).train().to(device)
    teacher = torch_models.create(teacher_name, NUM_CLASSES).eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    # alpha * CE + beta * T^2 * KL(batchmean): the same function as transferlab's 0.1 CE + 0.9 kd.
    kd_loss = KDLoss("fc", "output", "fc", "output", temperature=TEMPERATURE, alpha=CE_WEIGHT, beta=KD_WEIGHT)
    ce_loss = torch.nn.CrossEntropyLoss()
    box = {}

    def kd_step():
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = kd_loss({"fc": {"output": s_logits}}, {"fc": {"output": t_logits}}, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        box["loss"] = loss

    def student_step():
        loss = ce_loss(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        box["loss"] = loss

    def teacher_forward():
        with torch.no_grad():
            teacher(x)
        sync()

    fn = {"kd": kd_step, "student": student_step, "teacher": teacher_forward}[args.what]
    model = teacher if args.what == "teacher" else student
    timing = _time_calls(fn, args.warmup, args.iters)
    extra = {"loss": float(box["loss"])} if "loss" in box else {}
    if gpu:
        extra["peak_device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {**timing, "peak_rss_mib": _peak_rss_mib(),
            "rss_after_import_mib": rss_after_import, "params": sum(p.numel() for p in model.parameters()),
            "threads": torch.get_num_threads(), **extra}


# --------------------------------------------------------------------------- driver


def _machine_load(sample_s: float = 1.0) -> float:
    """Share of all CPUs busy over `sample_s` seconds (this driver itself sleeps meanwhile)."""
    busy0, t0 = _cpu_busy_s(), time.perf_counter()
    time.sleep(sample_s)
    return (_cpu_busy_s() - busy0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def _wait_idle(max_wait_s: float, threshold: float = 0.2) -> float:
    """Waits (up to `max_wait_s`) until other processes use < `threshold` of the CPUs; returns the last load."""
    deadline = time.perf_counter() + max_wait_s
    load = _machine_load()
    while load >= threshold and time.perf_counter() < deadline:
        load = _machine_load(2.0)
    return load


def _run_worker(side: str, pair: str, what: str, args, allocator: str, variant: str = "",
                fusion_barrier: str = "n/a") -> dict:
    """`--repeats` measurements, each in a fresh subprocess; the one with the median step time.

    Step times of one program differ by up to ~15% between processes on this machine
    (more than within one), so one process per figure is not enough.
    """
    results = [_run_worker_quiet(side, pair, what, args, allocator, variant, fusion_barrier)
               for _ in range(max(args.repeats, 1))]
    errors = [r for r in results if "error" in r]
    if errors:
        return errors[0]
    results.sort(key=lambda r: r["median_s"])
    chosen = dict(results[len(results) // 2])
    chosen["process_medians_ms"] = [round(r["median_s"] * 1e3, 1) for r in results]
    return chosen


def _run_worker_quiet(side, pair, what, args, allocator, variant, fusion_barrier) -> dict:
    """One measurement in a fresh subprocess; re-measured (up to --retries times) if other
    processes took > 25% of the CPUs meanwhile, keeping the least disturbed result."""
    best = None
    for _ in range(1 + max(args.retries, 0)):
        out = _run_worker_once(side, pair, what, args, allocator, variant, fusion_barrier)
        if "error" in out:
            return out
        if best is None or out["other_load"] < best["other_load"]:
            best = out
        if best["other_load"] <= 0.25:
            break
    return best


def _run_worker_once(side, pair, what, args, allocator, variant, fusion_barrier) -> dict:
    if args.wait_idle > 0:
        _wait_idle(args.wait_idle)
    env = _allocator_env(os.environ, allocator)
    if side == "jax":
        env["XLA_FLAGS"] = VARIANTS[variant]
        env["TRANSFERLAB_XLA_DEFAULTS"] = "0"  # (the variant's flags as given: 'default' is XLA's own)
        env["TRANSFERLAB_NATIVE_KERNELS"] = "0" if variant == "xla_conv" else "1"
        env["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--device", args.device,
           "--what", what, "--pair", pair,
           "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--fusion-barrier-value", fusion_barrier]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    out = json.loads(lines[-1][len("RESULT "):])
    out["wall_s"] = time.perf_counter() - t0
    if out.get("allocator") != allocator:
        return {"error": f"asked for allocator {allocator}, the worker ran with {out.get('allocator')}"}
    return out


def _fmt_ms(ms: float) -> str:
    """Whole milliseconds, or two decimals under 20 ms (GPU steps)."""
    return f"{ms:.0f}" if abs(ms) >= 20 else f"{ms:.2f}"


def _ms(r) -> str:
    return _fmt_ms(1e3 * r["median_s"]) if r and "median_s" in r else "—"


def _versions() -> dict:
    code = ("import json, importlib.metadata as m\n"
            "v = {}\n"
            "for p in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchdistill'):\n"
            "    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: v[p] = None\n"
            "print(json.dumps(v))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}


def _gpu_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default="resnet32x4:resnet8x4,resnet56:resnet20",
                   help="comma-separated teacher:student pairs")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations, the first being the compile")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default="ynn_off,default", help=f"JAX XLA_FLAGS variants: {','.join(VARIANTS)}")
    p.add_argument("--fusion-barrier", default="both", choices=("both", "on", "off"),
                   help="residual-block fusion_barrier model kwarg of the JAX models")
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="where both sides run: the CPU, or the first CUDA GPU")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/torchdistill side")
    p.add_argument("--allocators", default="",
                   help="host allocators, each measured on both sides: mimalloc, system (glibc malloc); "
                        "default: both on the CPU, system on a GPU")
    p.add_argument("--wait-idle", type=float, default=60.0,
                   help="before each measurement, wait up to this many seconds for other processes to use "
                        "< 20%% of the CPUs (0: don't wait); the load seen while timing is reported anyway")
    p.add_argument("--repeats", type=int, default=3,
                   help="fresh processes per figure; the process with the median step time is reported")
    p.add_argument("--retries", type=int, default=1,
                   help="re-measure a figure taken while other processes used > 25%% of the CPUs")
    p.add_argument("--json", default="", help="also write every raw measurement to this file")
    p.add_argument("--from-json", default="", metavar="FILE",
                   help="measure nothing: print the tables of an earlier run's --json file")
    # internal: one measurement in this process
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--what", choices=WHATS, help=argparse.SUPPRESS)
    p.add_argument("--pair", help=argparse.SUPPRESS)
    p.add_argument("--fusion-barrier-value", default="n/a", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.fusion_barrier = args.fusion_barrier_value
        result = (_jax_worker if args.worker == "jax" else _torch_worker)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.from_json:
        return _print_from_json(args.from_json)
    pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    for pair in pairs:
        if pair.count(":") != 1:
            p.error(f"--pairs: expected teacher:student, got {pair!r}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {', '.join(VARIANTS)}")
    barriers = ["off", "on"] if args.fusion_barrier == "both" else [args.fusion_barrier]
    allocators = [a.strip() for a in (args.allocators or ("mimalloc,system" if args.device == "cpu" else "system"))
                  .split(",") if a.strip()]
    for a in allocators:
        if a not in ALLOCATOR_LABELS:
            p.error(f"--allocators: {a!r} is not one of {', '.join(ALLOCATOR_LABELS)}")
    versions = _versions()
    started = datetime.datetime.now()
    where = f"{os.cpu_count()} CPUs ({_cpu_name()})"
    if args.device == "gpu":
        where = f"GPU {_gpu_name()}, host {where}"
    print(f"# KD step benchmark, {started:%Y-%m-%d %H:%M}, {where}, "
          f"batch {args.batch}, warmup {args.warmup}, median of {args.iters}")
    print("# " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + f", transferlab git {_git_commit()}")
    print("# command: " + " ".join(["python", os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
          flush=True)

    raw = []
    rows = []  # (pair, label, {what: result})
    for pair in pairs:
        torch_of = {}  # allocator -> torch results
        for allocator in allocators:
            if not args.no_torch and versions.get("torch") and versions.get("torchdistill"):
                res = {w: _run_worker("torch", pair, w, args, allocator) for w in WHATS}
                torch_of[allocator] = res
                rows.append((pair, _torch_label(allocator), res))
                raw.append({"pair": pair, "side": "torch", "allocator": allocator, **{w: res[w] for w in WHATS}})
                _progress(pair, _torch_label(allocator), res)
            elif not args.no_torch and allocator == allocators[0]:
                print("# torch/torchdistill not installed in this interpreter: run `bash bench/setup_peer.sh` and "
                      "use .venv-bench/bin/python", flush=True)
            for variant in variants:
                for barrier in barriers:
                    res = {w: _run_worker("jax", pair, w, args, allocator, variant, barrier) for w in WHATS}
                    label = _jax_label(variant, barrier, allocator)
                    rows.append((pair, label, res))
                    raw.append({"pair": pair, "side": "jax", "variant": variant, "fusion_barrier": barrier,
                                "allocator": allocator, **{w: res[w] for w in WHATS}})
                    _progress(pair, label, res)
        rows.append((pair, None, torch_of))  # marker: ratios against this pair's torch rows

    _print_tables(rows, house_peer=args.device == "cpu")
    print(f"\n# total wall time {(datetime.datetime.now() - started).total_seconds():.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "versions": versions, "results": raw}, f, indent=1)
    return 0


def _print_tables(rows, house_peer: bool = True):
    print()
    print(_table(rows, house_peer))
    print()
    print(_target_table(rows))
    print()
    print(_memory_table(rows))


def _print_from_json(path: str) -> int:
    """Re-prints the tables of a run saved with --json (rows in the order they were measured)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        raw = saved["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"kd_step: --from-json {path}: not a kd_step --json file ({e})", file=sys.stderr)
        return 2
    print("# tables re-printed from " + path + "; versions: "
          + ", ".join(f"{k} {v}" for k, v in saved.get("versions", {}).items() if v))
    rows, torch_of = [], {}
    for entry in raw:
        res = {w: entry[w] for w in WHATS}
        allocator = entry.get("allocator", "system")  # runs before --allocators used glibc malloc
        if entry["side"] == "torch":
            torch_of.setdefault(entry["pair"], {})[allocator] = res
            rows.append((entry["pair"], _torch_label(allocator), res))
        else:
            rows.append((entry["pair"], _jax_label(entry["variant"], entry["fusion_barrier"], allocator), res))
    rows += [(pair, None, res) for pair, res in torch_of.items()]
    _print_tables(rows, house_peer=saved.get("args", {}).get("device", "cpu") == "cpu")
    return 0


ALLOCATOR_LABELS = {"mimalloc": "mimalloc", "system": "glibc malloc"}


def _torch_label(allocator: str) -> str:
    return f"torch + torchdistill, {ALLOCATOR_LABELS[allocator]}"


def _jax_label(variant: str, barrier: str, allocator: str) -> str:
    return f"transferlab {variant}, barrier {barrier}, {ALLOCATOR_LABELS[allocator]}"


def _label_allocator(label: str) -> str:
    return next(a for a, text in ALLOCATOR_LABELS.items() if label.endswith(", " + text))


def _progress(pair, label, res):
    parts = []
    for w in WHATS:
        r = res[w]
        parts.append(f"{w} {_ms(r)} ms (min {_fmt_ms(1e3 * r['min_s'])}, other load {100 * r['other_load']:.0f}%, "
                     f"per process {r.get('process_medians_ms')})"
                     if "error" not in r else f"{w} ERROR {r['error']}")
    print(f"# {pair:22s} {label:46s} " + ", ".join(parts), flush=True)


def _by_pair(rows):
    out = {}
    for pair, label, res in rows:
        if label is not None:
            out.setdefault(pair, []).append((label, res))
    return out


def _ok(res, w):
    return res is not None and "median_s" in res.get(w, {})


def _table(rows, house_peer: bool = True) -> str:
    lines = ["| pair (teacher → student) | implementation | KD step ms | student step ms | teacher fwd ms "
             "| KD ratio tl/torch | KD speed-up torch/tl | student ratio | teacher ratio "
             "| KD speed-up vs torch glibc | first call s (KD) | KD min ms | other load % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    torch_of = {pair: res for pair, label, res in rows if label is None}
    for pair, entries in _by_pair(rows).items():
        for label, res in entries:
            ref = (torch_of.get(pair) or {}).get(_label_allocator(label))
            glibc = (torch_of.get(pair) or {}).get("system")
            cells = [_ms(res.get(w)) for w in WHATS]
            ratios = []
            for w in WHATS:
                if label.startswith("transferlab") and _ok(res, w) and _ok(ref, w):
                    ratios.append(res[w]["median_s"] / ref[w]["median_s"])
                else:
                    ratios.append(None)
            fmt = lambda r: "—" if r is None else f"{r:.2f}"  # noqa: E731
            speedup = "—" if ratios[0] is None else f"{1 / ratios[0]:.2f}×"
            vs_glibc = "—"
            if label.startswith("transferlab") and _ok(res, "kd") and _ok(glibc, "kd"):
                vs_glibc = f"{glibc['kd']['median_s'] / res['kd']['median_s']:.2f}×"
            first = f"{res['kd']['first_s']:.1f}" if _ok(res, "kd") else "—"
            best = _fmt_ms(1e3 * res['kd']['min_s']) if _ok(res, "kd") else "—"
            loads = [res[w]["other_load"] for w in WHATS if _ok(res, w)]
            load = f"{100 * max(loads):.0f}" if loads else "—"
            lines.append(f"| {pair.replace(':', ' → ')} | {label} | {' | '.join(cells)} | {fmt(ratios[0])} | "
                         f"{speedup} | {fmt(ratios[1])} | {fmt(ratios[2])} | {vs_glibc} | {first} | {best} | {load} |")
        house = HOUSE_PEER.get(pair) if house_peer else None  # a CPU figure
        if house:
            lines.append(f"| {pair.replace(':', ' → ')} | house peer figure (torchdistill) | "
                         f"{1e3 * house['kd']:.0f} | {1e3 * house['student']:.0f} | {1e3 * house['teacher']:.0f} "
                         f"| | | | | | | | |")
    return "\n".join(lines)


def _target_table(rows) -> str:
    lines = [f"| pair | implementation | KD step ms | student + {TARGET_TEACHER_FACTOR} × teacher ms "
             "| KD overhead over student + teacher ms | target met |",
             "|---|---|---:|---:|---:|:---:|"]
    for pair, entries in _by_pair(rows).items():
        for label, res in entries:
            if not all(_ok(res, w) for w in WHATS):
                continue
            kd, st, te = (1e3 * res[w]["median_s"] for w in WHATS)
            bound = st + TARGET_TEACHER_FACTOR * te
            over = kd - st - te
            over = f"{over:+.0f}" if kd >= 20 else f"{over:+.2f}"  # as many decimals as the KD step's
            lines.append(f"| {pair.replace(':', ' → ')} | {label} | {_fmt_ms(kd)} | {_fmt_ms(bound)} | {over} | "
                         f"{'yes' if kd <= bound else 'no'} |")
    return "\n".join(lines)


def _memory_table(rows) -> str:
    lines = ["| pair | implementation | peak RSS MiB: KD step | student step | teacher fwd "
             "| peak GPU MiB: KD step | student step | teacher fwd "
             "| RSS after imports | params student / teacher |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for pair, entries in _by_pair(rows).items():
        for label, res in entries:
            mem = [f"{res[w]['peak_rss_mib']:.0f}" if _ok(res, w) else "—" for w in WHATS]
            mem += [f"{res[w]['peak_device_mib']:.0f}" if _ok(res, w) and "peak_device_mib" in res[w] else "—"
                    for w in WHATS]
            base = f"{res['kd']['rss_after_import_mib']:.0f}" if _ok(res, "kd") else "—"
            n_s = f"{res['student']['params']:,}" if _ok(res, "student") else "—"
            n_t = f"{res['teacher']['params']:,}" if _ok(res, "teacher") else "—"
            lines.append(f"| {pair.replace(':', ' → ')} | {label} | {' | '.join(mem)} | {base} | {n_s} / {n_t} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
