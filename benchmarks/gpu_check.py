"""The prepared GPU check (issue 15): on whatever CUDA device it finds, with the paper's models at random weights
and synthetic tensors (no dataset, no download), in at most ~10 minutes:

1. CUDA-event time of one teacher TTA call (the recipe's batch x views, e.g. 16 x 10 = 160 views) and of one
   student step (forward, loss, backward, AdamW), eager and ``torch.compile``d, with the largest difference
   between the two outputs;
2. about 40 steps of the real loop (``ph_reg.method.train.distill``) in cached mode (``sync_every`` 1 and 8) and
   online mode (``sync_every`` 8), images per second after the first epoch;
3. every host sync of one training step between reads, under ``torch.cuda.set_sync_debug_mode("warn")``;
4. peak memory of each part;

and prints the achieved TFLOP/s against the device's dense bf16 peak and the GPU hours that the paper recipe
(docs/method.md: 31,783 Flickr30k images, 100 epochs) would take at the measured speed. The models and settings
are those of ``conf/paper`` and ``conf/paper_dinov2`` (resolved as Kedro does), with ``pretrained: null``.

    python benchmarks/gpu_check.py                 # both paper environments, ~10 min on one H100/H200
    python benchmarks/gpu_check.py --envs paper --no-compile --steps 20   # shorter
    python benchmarks/gpu_check.py --smoke         # the same code on the CPU with a tiny model (a dry run)

Without CUDA (and without ``--smoke``) it prints one line saying so and exits with status 0.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import replace

import _bench
import torch

#: Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of ``torch.cuda.get_device_name``; the first
#: match wins (vendor data sheets).
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                    ("RTX 4090", 165.0), ("A6000", 155.0))
PAPER_IMAGES, PAPER_EPOCHS = 31_783, 100  # docs/method.md section 5: Flickr30k, 100 epochs
BUDGET_S = 540.0


def bf16_peak(name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


class Clock:
    """CUDA events on CUDA, ``perf_counter`` after a synchronise elsewhere; milliseconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
        return sorted(times)[len(times) // 2]


def flops(fn: Callable[[], object]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def recipe(env: str, smoke: bool) -> dict:
    """The paper environment's backbone, heads, TTA and training settings (typed, validated), at random weights."""
    from ph_reg.params import student_distillation_params, teacher_denoising_params
    from ph_reg.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    params = CONFIG_LOADER_CLASS(str(_bench.REPO_ROOT / "conf"), env=env, **CONFIG_LOADER_ARGS)["parameters"]
    backbone = {**params["backbone"], "pretrained": None, "checkpoint": None}
    if smoke:  # the tiny test architecture, the same code paths
        backbone.update(arch="timm:test_vit", img_size=32)
        params["student_distillation"] = {**params["student_distillation"], "head": "final_norm",
                                          "trainable": ["registers", "last_block"], "num_registers": 2}
        params["teacher_denoising"] = {**params["teacher_denoising"], "head": "final_norm"}
    student_config, student = student_distillation_params(backbone, params["student_distillation"])
    teacher_config, teacher = teacher_denoising_params(backbone, params["teacher_denoising"])
    return {"env": env, "student_config": student_config, "student": student, "teacher_config": teacher_config,
            "teacher": teacher, "size": backbone["img_size"]}


def build(r: dict, device: torch.device):
    from ph_reg.models import build_backbone

    teacher = build_backbone(r["teacher_config"]).to(device).eval().requires_grad_(False)
    torch.manual_seed(0)
    student = build_backbone(r["student_config"]).to(device)
    student.set_trainable(list(r["student"].trainable))
    return teacher, student


def tta_call(r: dict, teacher, device: torch.device, clock: Clock, compile_: bool) -> dict:
    """One TTA call of the recipe's batch (all views through the teacher), eager and compiled."""
    from ph_reg.method.targets import OnlineTargets

    batch, size = r["teacher"].batch_size, r["size"]
    images = torch.randn(batch, 3, size, size, device=device)
    online = OnlineTargets(teacher, seed=0, tta=r["teacher"].tta,
                           max_images_per_forward=r["teacher"].max_images_per_forward)
    run = lambda: online(images, 0, list(range(batch)))  # noqa: E731
    out = {"views": batch * r["teacher"].tta.n_views, "flops": flops(run), "eager_ms": clock.time(run)}
    if compile_:
        eager = run()
        compiled = OnlineTargets(teacher, seed=0, tta=r["teacher"].tta,
                                 max_images_per_forward=r["teacher"].max_images_per_forward).compile()
        crun = lambda: compiled(images, 0, list(range(batch)))  # noqa: E731
        started = time.perf_counter()
        result = crun()
        out["compile_s"] = time.perf_counter() - started
        out["compiled_ms"] = clock.time(crun)
        out["max_diff"] = float((result - eager).abs().max())
    return out


def student_step(r: dict, student, device: torch.device, clock: Clock, compile_: bool) -> dict:
    """One step of the student: forward under the training precision, loss, backward, fused AdamW."""
    from ph_reg.method.loss import distillation_loss, parameter_groups
    from ph_reg.runtime import autocast

    batch, size = r["student"].training.batch_size, r["size"]
    images = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        target = student(images).patch.float()
    params = parameter_groups(student, 0.01)
    optimizer = torch.optim.AdamW(params, lr=1e-9, fused=device.type == "cuda")

    def step(model) -> torch.Tensor:
        with autocast(device, "auto"):
            output = model(images).patch
        loss, _ = distillation_loss(output, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.detach().float()

    out = {"images": batch, "flops": flops(lambda: step(student)), "eager_ms": clock.time(lambda: step(student))}
    if compile_:
        compiled = torch.compile(student)
        started = time.perf_counter()
        step(compiled)
        out["compile_s"] = time.perf_counter() - started
        out["compiled_ms"] = clock.time(lambda: step(compiled))
        with torch.no_grad(), autocast(device, "auto"):
            out["max_diff"] = float((compiled(images).patch.float() - student(images).patch.float()).abs().max())
    return out


def real_loop(r: dict, teacher, student_state, device: torch.device, mode: str, sync_every: int, steps: int,
              sync_probe: bool) -> dict:
    """About ``steps`` steps of ``distill`` (several epochs of a small synthetic set); images/s after epoch 1."""
    # long: builds the synthetic set, runs distill and probes one step; split, it would be harder to follow
    import ph_reg.method.train as train
    from ph_reg.method.data import RandomCrops, StoredImageLoader, TargetPairs
    from ph_reg.method.targets import OnlineTargets
    from ph_reg.models import build_backbone

    config = r["student"].training
    batch, size = config.batch_size, r["size"]
    n, epochs = 4 * batch, max(2, math.ceil(steps / 4))
    generator = torch.Generator().manual_seed(0)
    pixels = [{"image": torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8)}
              for _ in range(n)]
    torch.manual_seed(0)
    student = build_backbone(r["student_config"])
    student.set_trainable(list(r["student"].trainable))
    student.load_state_dict(student_state)
    if mode == "cached":
        grid = size // teacher.patch_size
        with torch.no_grad():
            dim = teacher(torch.zeros(1, 3, size, size, device=device)).patch.shape[-1]
        targets = [{"target": torch.randn(grid, grid, dim, generator=generator).half()} for _ in range(n)]
        dataset, online = TargetPairs(pixels, targets, range(n), student.mean, student.std, raw=True), None
    else:
        dataset = RandomCrops([StoredImageLoader(pixels, i) for i in range(n)], size, student.mean, student.std,
                              seed=0, raw=True)
        online = OnlineTargets(teacher, seed=0, tta=r["teacher"].tta,
                               max_images_per_forward=r["teacher"].max_images_per_forward)
    settings = replace(config, epochs=epochs, num_workers=0, sync_every=sync_every, drop_last=True, resume=False,
                       snapshot_every=None, snapshot_epochs=(), devices=1, num_nodes=1, compile=False)
    ends: list[float] = []
    real, probe = train._train_batch, {"calls": 0, "syncs": None}

    def probed(*args):  # the 3rd call of epoch 2 (a step between reads) under the sync debug mode
        probe["calls"] += 1
        if not (sync_probe and probe["calls"] == n // batch + 3):
            return real(*args)
        if device.type == "cuda":
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return real(*args)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    probe["syncs"] = [f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in caught
                                      if "synchroniz" in str(w.message)]
        from ph_reg.runtime import HostSyncCounter

        with HostSyncCounter() as counter:
            result = real(*args)
        probe["syncs"] = counter.sites
        return result

    reset_peak(device)
    train._train_batch = probed
    try:
        started = time.perf_counter()
        history = train.distill(student, dataset, settings, seed=0, progress=False, online_targets=online,
                                on_epoch_end=lambda epoch, row: ends.append(time.perf_counter()))
    finally:
        train._train_batch = real
    timed = ends[-1] - ends[0]
    images = sum(row["images"] for row in history[1:])
    return {"steps": sum(row["steps"] for row in history), "images_s": images / timed, "first_epoch_s":
            ends[0] - started, "syncs": probe["syncs"], "peak": peak_memory(device),
            "finite": all(math.isfinite(row["loss"]) for row in history)}


def check_env(env: str, args, device: torch.device, clock: Clock, deadline: float, peak: float | None) -> None:
    # long: the parts of one environment and their printed lines, read top to bottom
    r = recipe(env, args.smoke)
    config = r["student"].training
    print(f"\n== {env}: {r['student_config'].arch} at {r['size']} px, student {r['student'].head} + "
          f"{r['student'].num_registers} registers, teacher {r['teacher'].head}, batch {config.batch_size}, "
          f"{r['teacher'].tta.n_views} views, max_images_per_forward {r['teacher'].max_images_per_forward}")
    teacher, student = build(r, device)
    state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}

    def part(name: str, fn: Callable[[], None]) -> None:
        if time.perf_counter() > deadline:
            print(f"   {name}: SKIPPED (the time budget --budget-s is spent)")
            return
        try:
            reset_peak(device)
            fn()
        except Exception:  # report and go on: one failing part must not hide the others
            print(f"   {name}: FAILED\n" + "".join("      " + line for line in traceback.format_exc().splitlines(True)))
        sys.stdout.flush()

    def tflops(flop: float, ms: float) -> str:
        achieved = flop / (ms * 1e-3) / 1e12
        return f"{achieved:.1f} TFLOP/s" + (f" = {achieved / peak:.0%} of the bf16 peak" if peak else "")

    def compiled(timing: dict) -> str:  # the compiled column of a tta_call / student_step result, when it ran
        if "compiled_ms" not in timing:
            return ""
        speedup = timing["eager_ms"] / timing["compiled_ms"]
        return (f"; compiled {timing['compiled_ms']:.1f} ms (x{speedup:.2f}, compile {timing['compile_s']:.0f} s, "
                f"max |compiled - eager| {timing['max_diff']:.2e})")

    speeds: dict[str, float] = {}

    def tta() -> None:
        t = tta_call(r, teacher, device, clock, not args.no_compile)
        line = (f"   TTA call ({t['views']} views): eager {t['eager_ms']:.1f} ms, {tflops(t['flops'], t['eager_ms'])}, "
                f"{t['flops'] / 1e12:.2f} TFLOP")
        print(line + compiled(t) + f"; peak {peak_memory(device)}")
        speeds["tta_ms"] = min(t["eager_ms"], t.get("compiled_ms", math.inf))

    def step() -> None:
        s = student_step(r, student, device, clock, not args.no_compile)
        line = (f"   student step ({s['images']} images): eager {s['eager_ms']:.1f} ms, "
                f"{tflops(s['flops'], s['eager_ms'])}, {s['images'] / s['eager_ms'] * 1e3:.0f} images/s")
        print(line + compiled(s) + f"; peak {peak_memory(device)}")

    def loop(mode: str, sync_every: int) -> Callable[[], None]:
        def run() -> None:
            result = real_loop(r, teacher, state, device, mode, sync_every, args.steps, sync_probe=sync_every > 1)
            speeds[f"{mode}/{sync_every}"] = result["images_s"]
            print(f"   real loop, {mode}, sync_every {sync_every}: {result['steps']} steps, "
                  f"{result['images_s']:.1f} images/s after epoch 1 (epoch 1 {result['first_epoch_s']:.1f} s), "
                  f"losses finite: {result['finite']}; peak {result['peak']}")
            if result["syncs"] is not None:
                print(f"      host syncs in one step between reads: {len(result['syncs'])}"
                      + "".join(f"\n        {s}" for s in result["syncs"]))
        return run

    part("TTA call", tta)
    part("student step", step)
    part("real loop cached/1", loop("cached", 1))
    part("real loop cached/8", loop("cached", 8))
    part("real loop online/8", loop("online", 8))
    per_image = PAPER_IMAGES * config.epochs
    for key, label in (("online/8", "online"), ("cached/8", "cached")):
        if key in speeds:
            hours = per_image / speeds[key] / 3600
            extra = ""
            if key == "cached/8" and "tta_ms" in speeds:  # plus the one teacher pass that writes the targets
                teacher_h = PAPER_IMAGES / r["teacher"].batch_size * speeds["tta_ms"] / 1e3 / 3600
                hours, extra = hours + teacher_h, f" (incl. {teacher_h:.2f} h for the teacher pass)"
            print(f"   the paper recipe ({PAPER_IMAGES} images x {config.epochs} epochs), {label}: "
                  f"{hours:.1f} GPU hours at this speed{extra}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", default="paper,paper_dinov2", help="paper environments to check, comma-separated")
    p.add_argument("--steps", type=int, default=40, help="steps of the real loop per run (about)")
    p.add_argument("--no-compile", action="store_true", help="leave out torch.compile (it takes minutes)")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="parts still to run after this are skipped")
    p.add_argument("--smoke", action="store_true", help="run on the CPU with a tiny model (checks this script)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing to measure. Run it on a "
              "GPU machine: python benchmarks/gpu_check.py")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    peak = bf16_peak(name) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print(f"gpu_check on {name}: torch {torch.__version__}, bf16 dense peak "
          + (f"{peak:.0f} TFLOP/s" if peak else "unknown for this device (not in BF16_PEAK_TFLOPS): TFLOP/s are "
             "printed without a share of the peak"))
    if args.smoke:
        args.steps, args.no_compile = min(args.steps, 8), True
    deadline = time.perf_counter() + args.budget_s
    for env in args.envs.split(","):
        check_env(env.strip(), args, device, Clock(device), deadline, peak)
    print(f"\ngpu_check done in {time.perf_counter() - deadline + args.budget_s:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
