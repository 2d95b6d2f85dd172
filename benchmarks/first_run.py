"""The first run's time, measured: set-up (a fresh virtual environment) and the run itself, node by node.

    python benchmarks/first_run.py install [--quick]   # pip install -e . vs -e ".[test]", each in a fresh venv
    python benchmarks/first_run.py nodes [RECORD ...]  # per-node seconds and shares of run records
    python benchmarks/first_run.py shared [--quick]    # the evaluation's shared work vs the same work repeated

``install`` times what ``bash scripts/dev.sh run`` (the project alone) and ``bash scripts/dev.sh test`` (with the test
extra) install on a fresh machine, one after the other in one call, and prints both and their ratio. A fresh
machine has no pip cache, so by default pip runs with ``--no-cache-dir``; ``--quick`` lets it use the cache (faster,
not what a new user sees). Wheels found on this machine (``PIP_FIND_LINKS``) are used as pip finds them.

``nodes`` reads the run records that every ``kedro run`` writes (``data/run_info/*.json``, ``node_seconds``: each
node's wall time from its first input load to its last output save) and prints a Markdown table of seconds and
shares; with several records (the DVC stages write one each) the nodes of all of them are listed together.

``shared`` times, side by side in one call on the default's model (``--quick``: the tiny test CLIP), the two places
where the evaluation used to repeat work: the planted benchmark's features as separate forwards (dense output,
then pre-norm tokens; two TTA passes for the target) against ``benchmark_features`` (one forward each, one TTA
pass), and the zero-shot evaluation followed by the separate figures against ``zero_shot_run`` (one text tower,
one model per head, each image read once, the figures from the evaluation's predictions).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"run": ".", "test": ".[test]"}   # scripts/dev.sh: what each command installs


def time_install(target: str, folder: Path, use_cache: bool) -> float:
    """Seconds to create a venv in ``folder`` and ``pip install -e <target>`` the project into it, as dev.sh does
    (pip upgraded first)."""
    start = time.perf_counter()
    venv.create(folder, with_pip=True)
    python = str(folder / "bin" / "python")
    cache = [] if use_cache else ["--no-cache-dir"]
    subprocess.run([python, "-m", "pip", "install", "--quiet", *cache, "--upgrade", "pip"], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *cache, "-e", target], check=True, cwd=PROJECT_ROOT)
    return time.perf_counter() - start


def install(quick: bool) -> None:
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="ph-reg-install-") as tmp:
        for name, target in VARIANTS.items():
            seconds[name] = time_install(target, Path(tmp) / name, use_cache=quick)
            print(f"dev.sh {name}: pip install -e {target!r} in a fresh venv: {seconds[name]:.1f} s", flush=True)
    print(f"ratio run / test: {seconds['run'] / seconds['test']:.2f} (pip cache {'used' if quick else 'off'})")


def node_table(records: list[Path]) -> str:
    rows: list[tuple[str, float]] = []
    for path in records:
        rows += list(json.loads(path.read_text()).get("node_seconds", {}).items())
    total = sum(seconds for _, seconds in rows)
    lines = ["| node | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.1f} | {seconds / total:.1%} |" for name, seconds in rows]
    lines.append(f"| **all** | {total:.1f} | 100% |")
    return "\n".join(lines)


def _default_models(quick: bool):
    from ph_reg.models import BackboneConfig, build_backbone

    arch, size = ("open_clip:ph-reg-tiny-ViT-16", 64) if quick else ("open_clip:ViT-B-16", 224)
    implant = {"fraction": 0.04, "strength": 6.0, "position_weight": 1.5, "block": None, "seed": 0}
    teacher = BackboneConfig(arch, img_size=size, head="naclip", implant=implant)
    student = BackboneConfig(arch, img_size=size, head="maskclip", implant=implant, num_registers=16, student=True)
    return teacher, build_backbone(teacher).eval(), build_backbone(student).eval(), size


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def shared(quick: bool) -> None:
    """Side by side: the evaluation's work done once (as the nodes do now) and repeated (as they did)."""
    import dataclasses

    import torch

    from ph_reg.evaluation.features import dense_features
    from ph_reg.evaluation.planted import benchmark_features, tta_tokens
    from ph_reg.evaluation.zeroshot.run import zero_shot_evaluation, zero_shot_figures, zero_shot_run
    from ph_reg.method.tta import TTAConfig
    from ph_reg.models import clean_copy
    from ph_reg.runtime import normalize

    base, teacher, student, size = _default_models(quick)
    clean = clean_copy(teacher)
    count = 2 if quick else 4
    pixels = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = normalize(pixels, teacher.mean, teacher.std)
    tta = TTAConfig(n_views=10)

    def planted_repeated():
        for model in (clean, teacher, student):
            dense_features(model, images), dense_features(model, images, pre_norm=True)
        tta_tokens(teacher, images, 0, tta), tta_tokens(teacher, images, 0, tta, pre_norm=True)
        tta_tokens(clean, images, 0, tta)

    once = _timed(lambda: benchmark_features({"student": student}, clean, teacher, images, seed=0, tta=tta))
    repeated = _timed(planted_repeated)
    print(f"planted features, {count} images: one forward {once:.1f} s, repeated {repeated:.1f} s, "
          f"ratio {once / repeated:.2f}", flush=True)

    bench = {"dataset": {"type": "synthetic", "num_images": 3 if quick else 6, "image_size": size, "seed": 1,
                         "split": "val"},
             "classes": "dataset", "settings": {"short_side": size, "crop": size, "stride": size // 2, "batch_size": 8}}
    heads, tta = ["naclip", "maskclip", "ph_reg"], dataclasses.replace(tta, n_views=10)
    figure = {"benchmark": "synthetic", "images": 2, "query": "ball", "spec": bench}
    once = _timed(lambda: zero_shot_run(student, base, heads, {"synthetic": bench}, figure, tta=tta))
    repeated = _timed(lambda: (zero_shot_evaluation(student, base, heads, {"synthetic": bench}, tta=tta),
                               zero_shot_figures(student, base, heads, bench, 2, "ball", tta=tta, name="synthetic")))
    print(f"zero-shot with figures: shared {once:.1f} s, evaluation then figures {repeated:.1f} s, "
          f"ratio {once / repeated:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install_parser = sub.add_parser("install", help="time the set-up of dev.sh run and dev.sh test")
    install_parser.add_argument("--quick", action="store_true", help="use the pip cache (not a fresh machine)")
    shared_parser = sub.add_parser("shared", help="the evaluation's shared work vs the same work repeated")
    shared_parser.add_argument("--quick", action="store_true", help="the tiny test CLIP instead of ViT-B/16")
    nodes_parser = sub.add_parser("nodes", help="per-node times of run records")
    nodes_parser.add_argument("records", nargs="*", type=Path,
                              default=sorted((PROJECT_ROOT / "data/run_info").glob("*.json")))
    args = parser.parse_args(argv)
    if args.command == "install":
        install(args.quick)
    elif args.command == "shared":
        shared(args.quick)
    else:
        if not args.records:
            sys.exit("no run record: run `kedro run` first (it writes data/run_info/<pipelines>.json)")
        print(node_table(args.records))


if __name__ == "__main__":
    main()
