"""Host syncs, operations and bytes per training step, before and after the sync-free step (issue 15), side by
side in one run; and ``torch.compile`` of the student step against eager on this CPU.

For each tree (``--before``: a ``git archive`` of the code before, e.g. ``/tmp/h7_base/src``; the working tree
after) a child process trains the same random-weight student for a few steps, cached and online, and wraps the
loop's ``_train_batch`` to count, per step:

- host syncs: tensor reads that make the host wait on CUDA (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()``/
  ``float()``/``int()`` of a tensor, ``nonzero``, boolean indexing), counted on the CPU by
  ``ph_reg.runtime.HostSyncCounter`` (loaded from this tree's file, so both trees are counted alike); reads of the
  host-side TTA index code and of AdamW's CPU step counters are counted apart (``host-side``);
- operations: aten ops dispatched (a ``TorchDispatchMode``), the host-bound cost of a step on a GPU;
- bytes: the tensors of the batch the loader hands the step (what crosses to the device).

The "after" tree runs ``sync_every`` 1 (the default) and ``--sync-every`` (default 8), the latter also with the fused
AdamW that a deferred CUDA run uses; the syncs are reported for the steps between the epoch's first and last (both
read: steps 2 to K-1) and, apart, for all steps. Then ``torch.compile`` (inductor) of the
student's forward + loss + backward is timed against eager on this CPU (CPU is not the target device: the ratio is
reported whatever it is).

    python benchmarks/host_syncs.py --before /tmp/h7_base/src [--quick]
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench

HERE = Path(__file__).resolve()
RUNTIME = _bench.REPO_ROOT / "src" / "ph_reg" / "runtime.py"


def _counter_class():
    spec = importlib.util.spec_from_file_location("_h7_runtime", RUNTIME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.HostSyncCounter


def child(args) -> dict:
    """One tree's per-step counts (runs in a child process whose sys.path starts with that tree)."""
    # long: the stores, the two modes and the counting wrapper of one child; runs against old and new code alike
    import inspect

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import ph_reg.method.train as train
    from ph_reg.io.shards import ShardReader, write_shards
    from ph_reg.method.config import DistillConfig
    from ph_reg.method.data import RandomCrops, StoredImageLoader, TargetPairs
    from ph_reg.method.targets import OnlineTargets, denoised_target_records
    from ph_reg.method.tta import TTAConfig
    from ph_reg.models import build_backbone

    counter = _counter_class()
    raw = "raw" in inspect.signature(TargetPairs).parameters  # the tree has uint8 inputs
    config = {"arch": args.arch, "img_size": args.img_size, "head": args.head}
    teacher = build_backbone({**config, "head": args.teacher_head})
    n = args.steps * args.batch
    pixels = torch.randint(0, 256, (n, 3, args.img_size, args.img_size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    tmp = Path(tempfile.mkdtemp())
    write_shards(tmp / "images", (({"image": p}, {"split": "train"}) for p in pixels))
    images = ShardReader(tmp / "images")
    tta = TTAConfig(n_views=args.views)
    write_shards(tmp / "targets", denoised_target_records(teacher, images, seed=0, tta=tta, batch_size=args.batch,
                                                          progress=False))
    targets = ShardReader(tmp / "targets")

    class Ops(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, a=(), kw=None):
            Ops.count += 1
            return func(*a, **(kw or {}))

    results = {}
    real = train._train_batch
    for mode in ("cached", "online"):
        for sync_every, fused in (((1, False), (args.sync_every, False), (args.sync_every, True)) if raw
                                  else ((None, False),)):
            extra = {"raw": True} if raw else {}
            if mode == "cached":
                dataset, online = TargetPairs(images, targets, range(n), teacher.mean, teacher.std, **extra), None
            else:
                dataset = RandomCrops([StoredImageLoader(images, i) for i in range(n)], args.img_size, teacher.mean,
                                      teacher.std, seed=0, **extra)
                online = OnlineTargets(teacher, seed=0, tta=tta)
            steps = []

            def counted(run, state, progress, batch, *rest):
                moved = sum(t.nbytes for t in (batch.image, batch.target) if isinstance(t, torch.Tensor))
                Ops.count = 0
                with counter() as syncs, Ops():
                    result = real(run, state, progress, batch, *rest)
                steps.append({"syncs": len(syncs.sites), "host_side": len(syncs.host_sites), "ops": Ops.count,
                              "bytes": moved, "sites": syncs.sites})
                return result

            train._train_batch = counted
            if fused:  # the optimizer a deferred CUDA run uses (fused AdamW, its found_inf skip)
                train.FUSED_ON_CPU = True
            torch.manual_seed(0)
            student = build_backbone({**config, "num_registers": args.registers})
            student.set_trainable(["registers", "pos_embed", "patch_embed", "last_block"])
            settings = {"epochs": 1, "batch_size": args.batch}
            if sync_every is not None:
                settings["sync_every"] = sync_every
            train.distill(student, dataset, DistillConfig(**settings), seed=0, progress=False,
                          online_targets=online)
            train._train_batch, train.FUSED_ON_CPU = real, False
            label = "before" if sync_every is None else f"sync_every={sync_every}" + (", fused AdamW" if fused else "")
            results[f"{mode}|{label}"] = steps
    return results


def compile_ratio(args) -> str:
    """Median time of a compiled / an eager student step (forward, loss, backward) on this CPU."""
    import torch

    from ph_reg.method.loss import distillation_loss
    from ph_reg.models import build_backbone

    torch.manual_seed(0)
    student = build_backbone({"arch": args.arch, "img_size": args.img_size, "head": args.head,
                              "num_registers": args.registers})
    student.set_trainable(["registers", "pos_embed", "patch_embed", "last_block"])
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    target = student(x).patch.detach().clone()

    def step(model):
        loss, _ = distillation_loss(model(x).patch, target)
        loss.backward()
        student.zero_grad(set_to_none=True)

    try:
        compiled = torch.compile(student)
        started = time.perf_counter()
        step(compiled)  # compilation
        compile_s = time.perf_counter() - started
    except Exception as error:  # inductor needs a C++ compiler: report, do not hide
        return f"torch.compile failed on this machine: {type(error).__name__}: {str(error)[:200]}"
    times = {"eager": [], "compiled": []}
    for _ in range(args.warmup):
        step(student), step(compiled)
    for r in range(args.repeats):
        for name, model in (("eager", student), ("compiled", compiled))[:: 1 if r % 2 == 0 else -1]:
            started = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - started)
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return (f"student step, compiled / eager on this CPU: {comp / eager:.2f} ({comp * 1e3:.0f} ms / "
            f"{eager * 1e3:.0f} ms, median of {args.repeats}; compilation {compile_s:.0f} s)")


def summary(name: str, steps: list[dict]) -> str:
    later = steps[1:-1] or steps  # between the epoch's first step and its last (both read)
    mean = lambda key, rows: sum(s[key] for s in rows) / len(rows)  # noqa: E731
    return (f"| {name} | {mean('syncs', later):.1f} | {mean('syncs', steps):.1f} | {mean('host_side', steps):.1f} | "
            f"{mean('ops', steps):.0f} | {mean('bytes', steps) / 1e6:.2f} |")


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=5, warmup=1)
    p.add_argument("--before", type=Path, help="src folder of the code before (git archive HEAD src)")
    p.add_argument("--arch", default="open_clip:ViT-B-16")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--head", default="maskclip")
    p.add_argument("--teacher-head", default="naclip")
    p.add_argument("--registers", type=int, default=16)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--child", help=argparse_hidden())
    args = p.parse_args()
    if args.quick:
        args.arch, args.img_size, args.head, args.teacher_head, args.registers = (
            "timm:test_vit", 32, "final_norm", "final_norm", 2)
        args.steps, args.repeats = 4, 3
    if args.child:
        print(json.dumps(child(args)))
        return
    _bench.header("host syncs, operations and bytes per training step", {
        "model": f"{args.arch} at {args.img_size} px, student head {args.head}, {args.registers} registers",
        "steps": f"{args.steps} per run, batch {args.batch}, {args.views} online views"})
    trees = [("after", _bench.REPO_ROOT / "src")] + ([("before", args.before)] if args.before else [])
    forwarded = [a for a in sys.argv[1:] if a != "--before" and a != str(args.before)]
    rows = []
    for label, src in trees:
        env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        out = subprocess.run([sys.executable, str(HERE), *forwarded, "--child", label], env=env, check=True,
                             capture_output=True, text=True).stdout
        results = json.loads(out.strip().splitlines()[-1])
        rows += [(f"{label}: {key}", steps) for key, steps in results.items()]
    print("| code: mode / reads | syncs per step (steps 2..K-1) | syncs per step (all) | host-side reads per step "
          "| aten ops per step | MB to the device per step |")
    print("|---|---|---|---|---|---|")
    for name, steps in sorted(rows, key=lambda r: (r[0].split(": ")[1].split("|")[0], r[0])):
        print(summary(name, steps))
    for name, steps in rows:
        sites = sorted({site for s in steps[1:] for site in s["sites"]})
        if sites:
            print(f"   {name}: waits at " + "; ".join(sites))
    print("   " + compile_ratio(args))
    print(f"   load average at the end: {_bench._load()}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
