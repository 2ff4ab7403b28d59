"""Does pretraining learn on real images at small scale? Pretrain, then probe, per real-image set and seed.

Every set is made of real images shipped inside installed Python packages (nothing is downloaded):

    digits    scikit-learn's 1,797 scanned handwritten digits (8 x 8, 10 classes), gray
    textures  patches of six gray photographs shipped with scikit-image (brick, grass, gravel, moon, cell,
              camera; class = source photo), train patches from the top half, test from the bottom half
    photos    patches of ten colour photographs shipped with scikit-image, scikit-learn and matplotlib
              (astronaut, cat, coffee, rocket, retina, Hubble field, immunohistochemistry, China, flower,
              Grace Hopper; class = source photo), train from the left half, test from the right half
              -- the HELD-OUT set: no recipe decision looked at it

For each (set, seed) it pretrains the preset (default ``demo_cpu``: the CPU demo's budget) with the set's
augmentation (``mri`` for gray sets, ``dinov2`` colour jitter for colour), then probes the teacher backbone and
its random twin (``random:<run>``, the same architecture and LayerScale init) with one fixed evaluator:
L2-normalised final CLS features (the evaluation's own transform and extractor), multinomial logistic
regression on them (C = 1, as the issue that asked for this script measured) and the cosine 20-NN vote
(temperature 0.07); also logistic regression on standardised features, which flatters random features
(their CLS tokens differ little in angle, and standardising blows those small differences up). It also reads the
run's metrics: DINO teacher entropy over training (as a fraction of log K) and which loss terms engaged.

    python benchmarks/learning.py                                   # 3 sets x 3 seeds, about 50 min on 2 CPU cores
    python benchmarks/learning.py --sets digits --seeds 0 optim.base_lr=0.004 optim.scaling_rule=none

Writes ``<out>/learning.json`` and ``<out>/learning.md`` (default out: ``benchmark_runs/learning``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

HELD_OUT = "photos"
SET_VERSION = 1  # bump when a set's images change


# ------------------------------------------------------------------------------------------ the real-image sets

def _save_split(root: Path, split: str, images: Dict[str, List[np.ndarray]]) -> None:
    from PIL import Image

    for label, arrays in images.items():
        folder = root / split / label
        folder.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            Image.fromarray(array).save(folder / f"{i:04d}.png")


def make_digits(root: Path) -> None:
    """scikit-learn digits: 8 x 8 scans, 0..16 -> 0..255; stratified 1,000 train / 797 test (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(images)), train_size=1000, random_state=0,
                                           stratify=digits.target)
    for split, idx in (("Training", idx_train), ("Testing", idx_test)):
        _save_split(root, split, {str(d): [images[i] for i in idx if digits.target[i] == d] for d in range(10)})


def _patches(image: np.ndarray, region: str, n: int, size: int, rng: np.random.Generator) -> List[np.ndarray]:
    """n random size x size patches from one half of `image` (top/bottom or left/right), never crossing it."""
    h, w = image.shape[:2]
    rows, cols = (0, h), (0, w)
    if region in ("top", "bottom"):
        rows = (0, h // 2) if region == "top" else (h // 2, h)
    else:
        cols = (0, w // 2) if region == "left" else (w // 2, w)
    ys = rng.integers(rows[0], rows[1] - size + 1, n)
    xs = rng.integers(cols[0], cols[1] - size + 1, n)
    return [np.ascontiguousarray(image[y:y + size, x:x + size]) for y, x in zip(ys, xs)]


def _shrink(image: np.ndarray, short_side: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = short_side / min(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.BICUBIC))


def _patch_set(root: Path, sources: Dict[str, np.ndarray], halves: Sequence[str], n_train: int, n_test: int,
               size: int, short_side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for label, image in sources.items():
        image = _shrink(image, short_side)
        train[label] = _patches(image, halves[0], n_train, size, rng)
        test[label] = _patches(image, halves[1], n_test, size, rng)
    _save_split(root, "Training", train)
    _save_split(root, "Testing", test)


def make_textures(root: Path) -> None:
    """Six gray scikit-image photographs, 48 px patches at a 256 px short side; 150 train / 60 test each."""
    import skimage.data as sk

    sources = {name: getattr(sk, name)() for name in ("brick", "grass", "gravel", "moon", "cell", "camera")}
    _patch_set(root, sources, ("top", "bottom"), 150, 60, size=48, short_side=256, seed=1)


def make_photos(root: Path) -> None:
    """Ten colour photographs from three packages, 48 px patches at a 256 px short side; 100 train / 50 test."""
    import matplotlib.cbook
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    sources = {"astronaut": sk.astronaut(), "cat": sk.chelsea(), "coffee": sk.coffee(), "rocket": sk.rocket(),
               "retina": sk.retina(), "hubble": sk.hubble_deep_field(), "ihc": sk.immunohistochemistry(),
               "china": load_sample_image("china.jpg"), "flower": load_sample_image("flower.jpg"),
               "hopper": hopper}
    _patch_set(root, sources, ("left", "right"), 100, 50, size=48, short_side=256, seed=2)


SETS: Dict[str, Dict[str, Any]] = {
    "digits": dict(make=make_digits, augmentation="mri", kind="scanned handwriting, gray, 8 x 8"),
    "textures": dict(make=make_textures, augmentation="mri", kind="gray photographs, 48 px patches"),
    "photos": dict(make=make_photos, augmentation="dinov2", kind="colour photographs, 48 px patches"),
}


def build_set(name: str, cache: Path) -> Path:
    """Write set `name` under `cache` once (a marker file says it is complete); returns its root."""
    root = cache / f"{name}_v{SET_VERSION}"
    marker = root / ".complete"
    if not marker.exists():
        if root.exists():
            import shutil

            shutil.rmtree(root)
        try:
            SETS[name]["make"](root)
        except ImportError as exc:
            raise SystemExit(f"set {name!r} needs {exc.name}: pip install -e '.[benchmarks]'") from exc
        marker.write_text("ok\n")
    return root


# ------------------------------------------------------------------------------------------ pretrain and probe

def set_overrides(set_name: str, data: Path) -> List[str]:
    """The data keys every pretraining on ``set_name`` uses (the set's folder, augmentation and statistics)."""
    colour = SETS[set_name]["augmentation"] == "dinov2"  # colour images: ImageNet statistics and colour jitter
    return [f"data.path={data}", "data.kind=kaggle", "data.split=Training", "data.num_workers=0",
            f"data.augmentation={SETS[set_name]['augmentation']}",
            *(["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]", "data.intensity_jitter=true"]
              if colour else [])]


def pretrain(data: Path, run_dir: Path, preset: str, set_name: str, seed: int, overrides: Sequence[str],
             progress: bool) -> Dict[str, Any]:
    import torch

    from dinov2_repro.config import configs_dir, load_config
    from dinov2_repro.train.engine import train
    from dinov2_repro.train.schedules import Schedules

    cfg = load_config(configs_dir() / "train" / f"{preset}.yaml", [
        *set_overrides(set_name, data), f"train.seed={seed}",
        f"logging.progress_bar={'true' if progress else 'false'}", "evaluation.eval_period_iterations=100000",
        "checkpoint.period_iterations=100000", *overrides])
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        summary = train(cfg, run_dir, resume=False)
    schedules = Schedules.from_config(cfg, int(summary["global_batch"]))  # warm-up as trained (train.iterations)
    return dict(summary=summary, seconds=time.perf_counter() - start,
                n_prototypes=int(cfg.dino.head_n_prototypes), warmup_iterations=schedules.lr_warmup_iterations)


def training_signals(run_dir: Path, n_prototypes: int, warmup_iterations: int) -> Dict[str, Any]:
    """Teacher entropy / log K over training and which loss terms engaged, from the run's metrics.jsonl.

    A term engaged when its loss ends clearly below its uniform value log K (a uniform teacher gives targets with
    no per-image signal, and the loss can only sit at or above log K); KoLeo when it fell from its start. DINO
    not when its low loss is a teacher that gives every image the same prototype (the batch-mean target's
    entropy, log K - KL to uniform, under the collapse monitor's one-prototype bound, 0.05 log K).
    """
    from dinov2_repro.train.guards import CollapseMonitor
    from dinov2_repro.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "teacher_entropy" in r]
    log_k = math.log(n_prototypes)
    its = [int(r["iteration"]) for r in records]
    frac = [float(r["teacher_entropy"]) / log_k for r in records]
    after = [f for i, f in zip(its, frac) if i > warmup_iterations] or frac[-1:]
    tail = records[-max(1, len(records) // 10):]

    def tail_mean(key: str) -> float:
        return statistics.fmean(float(r.get(key, float("nan"))) for r in tail)

    first_koleo = float(records[0].get("koleo_loss", float("nan")))
    # A term switched off (weight 0) logs 0: it did not engage.
    engaged = {term: 0 < tail_mean(f"{term}_loss") < 0.9 * log_k for term in ("dino", "ibot")}
    engaged["dino"] &= not CollapseMonitor(n_prototypes, patience=1).shares_one_target(
        tail_mean("teacher_kl_to_uniform"))
    engaged["koleo"] = tail_mean("koleo_loss") < first_koleo - 0.05
    step = max(1, len(records) // 12)
    return dict(entropy_curve=[(i, round(f, 4)) for i, f in list(zip(its, frac))[::step]],
                entropy_after_warmup_max=max(after), entropy_after_warmup_mean=statistics.fmean(after),
                final_losses={k: tail_mean(k) for k in ("dino_loss", "ibot_loss", "koleo_loss")},
                log_k=log_k, engaged=engaged)


def collapse_warnings(run_dir: Path) -> int:
    """How many collapse warnings the run logged (guards.CollapseMonitor, in train.log)."""
    log_path = run_dir / "train.log"
    return log_path.read_text().count("possible collapse at iteration") if log_path.exists() else 0


def features(spec: str, data: Path, splits: Sequence[str] = ("Training", "Testing")):
    from dinov2_repro.data.datasets import open_labeled_dataset
    from dinov2_repro.eval.backbone_spec import load_backbone
    from dinov2_repro.eval.features import EvalTransform, extract_features

    model, info = load_backbone(spec)
    crop = int(info["eval_img_size"])
    transform = EvalTransform(round(crop / 0.875), crop, info["mean"], info["std"])
    out = {}
    for split in splits:
        fs = extract_features(model, open_labeled_dataset(data, split), transform, n_last_blocks=1)
        out[split] = (fs.knn_input().float().numpy(), fs.labels.numpy())
    return out


def probe(spec: str, data: Path) -> Dict[str, float]:
    """Test accuracy of logistic regression and the cosine 20-NN vote on L2-normalised CLS features."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dinov2_repro.eval.knn import knn_probabilities

    feats = features(spec, data)
    (x_train, y_train), (x_test, y_test) = feats["Training"], feats["Testing"]
    x_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True).clip(1e-12)
    x_test = x_test / np.linalg.norm(x_test, axis=1, keepdims=True).clip(1e-12)

    def logreg(clf) -> float:
        return float((clf.fit(x_train, y_train).predict(x_test) == y_test).mean())

    linear = logreg(LogisticRegression(C=1.0, max_iter=5000))
    linear_std = logreg(make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)))
    n_classes = int(max(y_train.max(), y_test.max()) + 1)
    probs = knn_probabilities(torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test),
                              ks=[20], n_classes=n_classes)[20]
    knn = float((probs.argmax(1).numpy() == y_test).mean())
    return dict(linear=linear, knn=knn, linear_standardised=linear_std)


def run_one(set_name: str, seed: int, args, data: Path) -> Dict[str, Any]:
    run_dir = Path(args.out) / "runs" / f"{set_name}_seed{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    trained = pretrain(data, run_dir, args.preset, set_name, seed, args.overrides, not args.no_progress)
    signals = training_signals(run_dir, trained["n_prototypes"], trained["warmup_iterations"])
    pre, rnd = probe(str(run_dir), data), probe(f"random:{run_dir}", data)
    result = dict(set=set_name, seed=seed, pretrained=pre, random=rnd, seconds=trained["seconds"],
                  collapse_warnings=collapse_warnings(run_dir), **signals)
    print(f"[{set_name} seed {seed}] linear {pre['linear']:.3f} vs random {rnd['linear']:.3f}; k-NN "
          f"{pre['knn']:.3f} vs {rnd['knn']:.3f}; entropy/logK after warm-up max "
          f"{signals['entropy_after_warmup_max']:.3f}; engaged {signals['engaged']}; {trained['seconds']:.0f} s",
          flush=True)
    return result


# ------------------------------------------------------------------------------------------ report

def aggregate(results: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    by_set: Dict[str, Dict[str, Any]] = {}
    for name in dict.fromkeys(r["set"] for r in results):
        rows = [r for r in results if r["set"] == name]
        agg: Dict[str, Any] = dict(n_seeds=len(rows), held_out=name == HELD_OUT)
        for probe_name in ("linear", "knn", "linear_standardised"):
            pre = [r["pretrained"][probe_name] for r in rows]
            rnd = [r["random"][probe_name] for r in rows]
            gain = [p - q for p, q in zip(pre, rnd)]
            agg[probe_name] = dict(pretrained_mean=statistics.fmean(pre), random_mean=statistics.fmean(rnd),
                                   pretrained_std=statistics.pstdev(pre), gain_mean=statistics.fmean(gain),
                                   gain_min=min(gain))
        agg["entropy_after_warmup_max"] = max(r["entropy_after_warmup_max"] for r in rows)
        agg["engaged"] = {t: all(r["engaged"][t] for r in rows) for t in ("dino", "ibot", "koleo")}
        agg["collapse_warnings"] = sum(int(r.get("collapse_warnings") or 0) for r in rows)
        by_set[name] = agg
    return by_set


def markdown(by_set: Dict[str, Dict[str, Any]], meta: Dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    lines = [f"# Learning on real images ({meta['date']})", "",
             f"Preset `{meta['preset']}` {' '.join(meta['overrides'])}; seeds {meta['seeds']}; {meta['machine']}; "
             f"command `{meta['command']}`.", "",
             "| set | linear: pretrained | random | gain (min) | k-NN: pretrained | random | gain (min) "
             "| standardised linear: pretrained / random | entropy/logK after warm-up (max) | engaged "
             "| collapse warnings |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in by_set.items():
        lin, knn = a["linear"], a["knn"]
        engaged = ", ".join(t for t, ok in a["engaged"].items() if ok) or "none"
        label = f"{name} (held out)" if a["held_out"] else name
        lines.append(f"| {label} | {pct(lin['pretrained_mean'])} ± {pct(lin['pretrained_std'])} | "
                     f"{pct(lin['random_mean'])} | {100 * lin['gain_mean']:+.1f} ({100 * lin['gain_min']:+.1f}) | "
                     f"{pct(knn['pretrained_mean'])} ± {pct(knn['pretrained_std'])} | {pct(knn['random_mean'])} | "
                     f"{100 * knn['gain_mean']:+.1f} ({100 * knn['gain_min']:+.1f}) | "
                     f"{pct(a['linear_standardised']['pretrained_mean'])} / "
                     f"{pct(a['linear_standardised']['random_mean'])} | {a['entropy_after_warmup_max']:.2f} | {engaged} | {a['collapse_warnings']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--seeds", default="0,1,2", help="pretraining seeds (train.seed)")
    parser.add_argument("--preset", default="demo_cpu", help="pretraining preset under configs/train")
    parser.add_argument("--out", default="benchmark_runs/learning", help="output folder (sets are cached here)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="extra pretraining-config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    names = [s for s in args.sets.split(",") if s]
    unknown = [s for s in names if s not in SETS]
    if unknown:
        raise SystemExit(f"--sets: unknown set(s) {unknown}; choose from {list(SETS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    results = []
    for name in names:
        data = build_set(name, out / "sets")
        results += [run_one(name, seed, args, data) for seed in seeds]
    by_set = aggregate(results)
    import torch

    meta = dict(date=time.strftime("%Y-%m-%d"), preset=args.preset, overrides=list(args.overrides), seeds=seeds,
                machine=f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
                        f"{os.getloadavg()[0]:.1f} at the end",
                command="python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "learning.json").write_text(json.dumps(dict(meta=meta, sets=by_set, runs=results), indent=2))
    text = markdown(by_set, meta)
    (out / "learning.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
