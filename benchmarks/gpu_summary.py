"""Tables from a `gpu_suite.sh` results folder: step throughput/memory/MFU, ours vs the published step, the
largest batch, and the loader feeding the step. Writes Markdown and one JSON; targets are checked, not assumed.

    python benchmarks/gpu_summary.py RESULTS_DIR --markdown gpu_suite.md --json gpu_suite.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ARCH_NAMES = {"vit_small": "ViT-S/14", "vit_base": "ViT-B/14", "vit_large": "ViT-L/14"}
MFU_TARGETS = {"vit_small": 0.35, "vit_large": 0.50}  # the targets
WAIT_TARGET = 0.05


def load(folder: Path) -> Dict[str, Dict[str, Any]]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"warning: {path}: unreadable ({exc})", file=sys.stderr)
    return results


def sections(folder: Path) -> List[List[str]]:
    path = folder / "sections.tsv"
    return [line.split("\t") for line in path.read_text().splitlines()] if path.is_file() else []


def _gib(n: Optional[float]) -> str:
    return f"{n / 2 ** 30:.1f}" if n else "n/a"


def _arch(result: Dict[str, Any]) -> str:
    arch = (result.get("config") or {}).get("arch") or result["args"].get("arch", "?")
    return ARCH_NAMES.get(arch, arch)


def step_rows(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for name, r in results.items():
        if r.get("benchmark") != "train_step" or "images_per_s" not in r:
            continue
        variant = r["args"]["variant"] + (" + act. ckpt" if r["args"].get("activation_checkpointing") else "")
        rows.append({"name": name, "arch": _arch(r), "arch_key": r["config"]["arch"], "variant": variant,
                     "batch": r["batch_size"], "s_per_iter": r["time_stats"]["mean_s"],
                     "images_per_s": r["images_per_s"], "peak_gib": _gib(r.get("peak_memory_bytes")),
                     "peak_bytes": r.get("peak_memory_bytes"), "mfu": r.get("mfu"),
                     "first_s": r.get("first_iteration_s"),
                     "max_batch": (r.get("find_max_batch") or {}).get("max_batch_size")})
    return rows


def comparison_rows(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for size in ("s", "b", "l"):
        ours, pub = results.get(f"step_{size}_eager"), results.get(f"pub_{size}")
        if not ours or not pub or "images_per_s" not in ours or "images_per_s" not in pub:
            continue
        rows.append({"arch": _arch(ours), "batch": ours["batch_size"], "published_batch": pub["batch_size"],
                     "ours_images_per_s": ours["images_per_s"], "published_images_per_s": pub["images_per_s"],
                     "speed_ratio": ours["images_per_s"] / pub["images_per_s"],
                     "memory_ratio": (ours["peak_memory_bytes"] / pub["peak_memory_bytes"]
                                      if ours.get("peak_memory_bytes") and pub.get("peak_memory_bytes") else None),
                     "ours_peak_gib": _gib(ours.get("peak_memory_bytes")),
                     "published_peak_gib": _gib(pub.get("peak_memory_bytes")),
                     "published_attention": pub["attention"]["path"], "why": pub["attention"]["why"]})
    return rows


def e2e_rows(results: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for name, r in results.items():
        if r.get("benchmark") != "end_to_end" or "mean_iter_s" not in r:
            continue
        a = r["args"]
        rows.append({"name": name, "arch": ARCH_NAMES.get(a["arch"], a["arch"]), "batch": a["batch_size"],
                     "augment": "GPU" if a["gpu_augment"] else "CPU workers", "workers": a["num_workers"],
                     "images": (r.get("dataset") or {}).get("source", a.get("source")),
                     "loader_images_per_s": r["loader_only"]["images_per_s"], "wait": r["data_wait_fraction"],
                     "augment_s": r["mean_augment_s"], "step_s": r["mean_step_s"], "iter_s": r["mean_iter_s"],
                     "images_per_s": r["images_per_s"]})
    return rows


def markdown(results, runs, steps, comparison, e2e) -> str:
    env = next((r["environment"] for r in results.values() if "environment" in r), {})
    lines = [f"Device: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"Python {env.get('python', '?')}, {env.get('cpu_count', '?')} CPU cores.", "",
             "| section | exit | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {rc} | {s} |" for n, rc, s in runs]
    peak = next((r["matmul_peak"] for r in results.values() if "matmul_peak" in r), None)
    if peak:
        lines += ["", f"MFU denominator: {peak['label']} = {peak['flops_per_s'] / 1e12:.3g} TFLOP/s."]
    lines += ["", "| arch | variant | batch | s/iter | images/s | peak GiB | MFU | first iter s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(steps, key=lambda r: (r["arch"], r["variant"], r["batch"])):
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        target = MFU_TARGETS.get(r["arch_key"])
        if target is not None and r["mfu"] is not None:
            mfu += " (target met)" if r["mfu"] >= target else f" (target {100 * target:.0f}% missed)"
        extra = f" (largest that fits: {r['max_batch']})" if r["max_batch"] else ""
        lines.append(f"| {r['arch']} | {r['variant']} | {r['batch']}{extra} | {r['s_per_iter']:.4f} | "
                     f"{r['images_per_s']:.1f} | {r['peak_gib']} | {mfu} | {r['first_s']:.1f} |")
    if comparison:
        lines += ["", "| arch | batch | ours images/s | published images/s | ratio | ours GiB | published GiB | "
                      "memory ratio | published attention |", "|---|---|---|---|---|---|---|---|---|"]
        for c in comparison:
            mem = f"{c['memory_ratio']:.2f}" if c["memory_ratio"] else "n/a"
            lines.append(f"| {c['arch']} | {c['batch']} | {c['ours_images_per_s']:.1f} | "
                         f"{c['published_images_per_s']:.1f} | {c['speed_ratio']:.2f} | {c['ours_peak_gib']} | "
                         f"{c['published_peak_gib']} | {mem} | {c['published_attention']} ({c['why']}) |")
    if e2e:
        lines += ["", "| arch | batch | augmentation | workers | images | loader alone images/s | data wait | "
                      "augment s | step s | end-to-end images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(e2e, key=lambda r: (r["arch"], r["augment"])):
            verdict = "" if r["wait"] <= WAIT_TARGET else " (> 5%)"
            lines.append(f"| {r['arch']} | {r['batch']} | {r['augment']} | {r['workers']} | {r['images']} | "
                         f"{r['loader_images_per_s']:.0f} | {100 * r['wait']:.1f}%{verdict} | {r['augment_s']:.3f} | "
                         f"{r['step_s']:.3f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder")
    p.add_argument("--markdown", default="")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    folder = Path(args.folder)
    results = load(folder)
    runs, steps, comparison, e2e = sections(folder), step_rows(results), comparison_rows(results), e2e_rows(results)
    text = markdown(results, runs, steps, comparison, e2e)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"sections": runs, "steps": steps, "comparison": comparison,
                                               "end_to_end": e2e}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
