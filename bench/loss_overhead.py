"""Each KD method's train-step overhead over plain KD (transferlab, JAX; CPU or GPU).

For one teacher -> student pair on CIFAR-100 shapes (32x32x3, 100 classes, batch 64)
it builds the library's jitted KD step once per method preset of
`transferlab.methods` (the CIFAR-100 hyper-parameters of `experiments/kd/cifar100/`,
with the pair's per-pair overrides), plus the student's plain supervised step, and
times them *interleaved in one process*: every round runs each step twice and times
the second call (the first absorbs the previous method's after-effects, such as
CRD's half-gigabyte negatives gather being freed), so slow drifts of a shared
machine hit all methods alike. Reported per method: the median
step time, and its overhead over the plain-KD step (`kd`: 0.1 * CE + 0.9 * KD, T=4)
in ms and % of the KD step. Negative overheads within the noise (see the `kd` row's
spread) mean "no measurable overhead".

    .venv-bench/bin/python bench/loss_overhead.py                         # resnet56 -> resnet20
    .venv-bench/bin/python bench/loss_overhead.py --pair resnet32x4:resnet8x4 --rounds 5
    .venv-bench/bin/python bench/loss_overhead.py --methods kd,dkd,crd

Needs only transferlab's own environment (`.venv/bin/python` works too); no torch. Like the
CLI it re-executes itself with mimalloc preloaded (`TRANSFERLAB_ALLOCATOR=system`: glibc).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo (transferlab)
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")

from transferlab import host_allocator  # noqa: E402

host_allocator.reexec_with_mimalloc()  # the library's CPU allocator, as `python -m transferlab.main` uses

import kd_step  # noqa: E402  (bench/kd_step.py: the shared step builder and machine-load helpers)


def _terms_summary(distill: dict) -> str:
    terms = ", ".join(f"{t['name']} {t.get('weight', 1.0):g}" for t in distill["terms"])
    return f"CE {distill['ce_weight']:g} + {terms}" if terms else f"CE {distill['ce_weight']:g}"


def _fmt(ms: float, step_ms: float, sign: str = "") -> str:
    """Milliseconds with one decimal, or two where the steps take under 20 ms (GPU); sign='+' to sign them."""
    return f"{ms:{sign}.{1 if step_ms >= 20 else 2}f}"


def main(argv=None) -> int:
    from transferlab import methods

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="resnet56:resnet20", help="teacher:student")
    p.add_argument("--methods", default=",".join(methods.METHODS),
                   help="comma-separated method presets (transferlab.methods.METHODS)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compile")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fusion-barrier", default="on", choices=("on", "off"))
    p.add_argument("--compilation-cache", default="on", choices=("on", "off"),
                   help="JAX's persistent compilation cache in a temporary directory, so the programs every "
                        "method shares (teacher and student init) compile once: ~4x faster set-up, same steps")
    args = p.parse_args(argv)

    if args.pair.count(":") != 1:
        p.error(f"--pair: expected teacher:student, got {args.pair!r}")
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in methods.METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(methods.METHODS)}")
    if "kd" not in names:
        names.insert(0, "kd")
    teacher, student = args.pair.split(":")

    import jax

    if args.compilation_cache == "on":
        cache_dir = tempfile.mkdtemp(prefix="loss_overhead_xla_cache_")
        atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    started = datetime.datetime.now()
    device = jax.devices()[0]
    where = (f"{os.cpu_count()} CPUs ({kd_step._cpu_name()})" if device.platform == "cpu"
             else f"{device.device_kind} ({kd_step._gpu_name()}), host {os.cpu_count()} CPUs")
    print(f"# KD method overhead benchmark, {started:%Y-%m-%d %H:%M}, {where}, "
          f"pair {teacher} -> {student}, batch {args.batch}, median of {args.rounds} interleaved rounds")
    versions = kd_step._versions()
    print("# " + ", ".join(f"{k} {v}" for k, v in versions.items() if v and k in ("jax", "jaxlib", "flax"))
          + f", transferlab git {kd_step._git_commit()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"fusion barrier {args.fusion_barrier}, host allocator {kd_step._loaded_allocator()}")
    print("# command: " + " ".join(["python", "bench/loss_overhead.py"] + (argv or sys.argv[1:])), flush=True)

    steps, summaries, first_call = {}, {}, {}
    for name in ["student"] + names:
        if name == "student":
            fn, _, _ = kd_step.jax_step(args.pair, "student", args.batch, args.fusion_barrier)
            summaries[name] = "CE 1 (no teacher)"
        else:
            distill = methods.distill_section(name, **methods.pair_overrides(name, teacher, student))
            fn, err, _ = kd_step.jax_step(args.pair, "kd", args.batch, args.fusion_barrier, distill=distill)
            if fn is None:
                print(f"# {name}: {err}")
                continue
            summaries[name] = _terms_summary(distill)
        t0 = time.perf_counter()
        fn()
        first_call[name] = time.perf_counter() - t0
        steps[name] = fn
        print(f"# compiled {name:15s} first call {first_call[name]:.1f} s", flush=True)

    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times = {name: [] for name in steps}
    busy0, own0, wall0 = kd_step._cpu_busy_s(), kd_step._own_cpu_s(), time.perf_counter()
    for _ in range(args.rounds):
        for name, fn in steps.items():
            fn()  # untimed: absorbs what the previous method left behind (e.g. CRD's large buffers freed)
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    wall = time.perf_counter() - wall0
    other = max(0.0, (kd_step._cpu_busy_s() - busy0) - (kd_step._own_cpu_s() - own0)) / (wall * (os.cpu_count() or 1))

    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    kd_ms = med["kd"]
    spread = (max(times["kd"]) - min(times["kd"])) * 1e3
    print()
    print("| method | loss (CIFAR-100 preset) | step ms | overhead over KD ms | overhead % | min ms | first call s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in steps:
        over = "—" if name in ("kd", "student") else _fmt(med[name] - kd_ms, kd_ms, "+")
        pct = "—" if name in ("kd", "student") else f"{100 * (med[name] - kd_ms) / kd_ms:+.1f}"
        print(f"| {name} | {summaries[name]} | {_fmt(med[name], kd_ms)} | {over} | {pct} | "
              f"{_fmt(min(times[name]) * 1e3, kd_ms)} | {first_call[name]:.1f} |")
    print()
    print(f"# kd step spread (max - min over rounds) {_fmt(spread, kd_ms)} ms; "
          f"other processes used {100 * other:.0f}% of the CPUs while timing; total wall time {(datetime.datetime.now() - started).total_seconds():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
