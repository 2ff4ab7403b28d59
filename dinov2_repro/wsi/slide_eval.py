"""Slide-level evaluation of a backbone: gated attention-MIL on per-slide tile embeddings, with label fractions.

  1. Embeddings: for every labelled slide, the L2-normalised final CLS token of each kept tile (read from the slide
     by `WsiTileDataset`, the backbone's evaluation transform), at most ``max_tiles_per_slide`` of them (a seeded
     random subset). They go through the evaluation's feature cache (`eval.features.cached_features`) in
     ``<out>/embeddings/``, one file per (backbone, transform, slide, tile list): a second run reads them back.
  2. Splits: a held-out test split of the slides, stratified by class and seeded; with a ``patient`` column whole
     patients fall on one side. The training slides are then subsampled to 100/75/50/25% (stratified at slide
     level, whole patients, one subset per seed).
  3. Per (fraction, seed) a `GatedAttentionMIL` is trained on the training bags and evaluated on the test bags:
     ROC-AUC (binary, or macro one-vs-rest), balanced accuracy, accuracy and macro-F1; mean +- std over the seeds.
  4. ``metrics.json``, ``report.md`` and, per test slide, ``heatmaps/<id>.png``: the attention of the 100% model
     (the largest fraction when 100% is not run) of the first seed, painted at its tiles over the slide's thumbnail
     (the tiling's ``<id>.thumbnail.png`` when it is there, else a thumbnail read from the slide).

Python: ``evaluate_slides("runs/vits14", "tiles/", "slides.csv", "slide_eval/", SlideEvalOptions(seeds=(0, 1)))``.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .tiler import THUMBNAIL_SUFFIX, TILES_SUFFIX
from .tiles import WsiTileDataset, read_table, split_tile_sample, tile_tables

METRICS = (("roc_auc", "ROC-AUC"), ("balanced_accuracy", "balanced acc."), ("accuracy", "accuracy"),
           ("macro_f1", "macro F1"))


@dataclass(frozen=True)
class SlideEvalOptions:
    """What `evaluate_slides` does (see the module doc)."""

    fractions: Tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
    seeds: Tuple[int, ...] = (0, 1, 2)
    test_fraction: float = 0.3
    split_seed: int = 0
    max_tiles_per_slide: int = 0  # 0: every kept tile
    tile_seed: int = 0
    epochs: int = 20
    lr: float = 2e-4
    batch_size: int = 64
    device: str = "cpu"
    reader: str = "auto"
    report_heatmaps: int = 6  # heatmaps shown in report.md (all are written)
    thumbnail_size: int = 1024  # when the tiling's thumbnail is missing


@dataclass
class SlideBag:
    """One slide's tile embeddings (N, D), unit norm, and each tile's level-0 box (x, y, side)."""

    slide_id: str
    slide: str
    embeddings: torch.Tensor
    boxes: np.ndarray  # (N, 3) int64: x, y, level-0 side
    n_tiles_total: int  # tiles in the table, before the cap


# ------------------------------------------------------------------------------------------------ labels
@dataclass
class SlideLabels:
    """Labelled slides (sorted by id), their class index, classes (sorted names) and patients (or None)."""

    slide_ids: List[str]
    labels: List[int]
    classes: List[str]
    patients: Optional[List[str]]


def read_slide_labels(path, known: Sequence[str]) -> SlideLabels:
    """``slide_id,label[,patient]`` rows. Slide ids without a tile table, empty labels or patients, repeated ids
    and a slide given to two patients are one error naming them; tiled slides absent from the CSV are left out."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    if not rows or not {"slide_id", "label"} <= columns:
        raise ValueError(f"{path}: expected a CSV with columns slide_id,label[,patient] and one row per slide")
    has_patient = "patient" in columns
    known_set, problems, seen = set(known), [], {}
    for n, row in enumerate(rows, start=2):
        sid = (row["slide_id"] or "").strip()
        if not sid or not (row["label"] or "").strip() or (has_patient and not (row["patient"] or "").strip()):
            problems.append(f"line {n}: empty slide_id, label{' or patient' if has_patient else ''}")
        elif sid in seen:
            problems.append(f"slide {sid!r} listed twice (lines {seen[sid]} and {n})")
        else:
            seen[sid] = n
    unknown = sorted(s for s in seen if s not in known_set)
    if unknown:
        problems.insert(0, f"{len(unknown)} slide id(s) have no tile table: {', '.join(unknown)}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    rows = sorted(rows, key=lambda r: r["slide_id"].strip())
    names = [r["label"].strip() for r in rows]
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ValueError(f"{path}: one class only ({classes}); a slide-level evaluation needs two or more")
    index = {c: i for i, c in enumerate(classes)}
    return SlideLabels([r["slide_id"].strip() for r in rows], [index[c] for c in names], classes,
                       [r["patient"].strip() for r in rows] if has_patient else None)


def tables_by_slide(tiles) -> Dict[str, Path]:
    """slide id -> its coordinates table, for the tables at ``tiles`` (a folder or one table)."""
    return {table.name[: -len(TILES_SUFFIX)] if table.name.endswith(TILES_SUFFIX) else table.stem: table
            for table in tile_tables(tiles)}


# ------------------------------------------------------------------------------------------------ embeddings
def capped_indices(n: int, cap: int, seed: int, slide_id: str) -> np.ndarray:
    """All of ``range(n)``, or a sorted random ``cap`` of them, seeded by ``seed`` and the slide id."""
    if cap <= 0 or n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([int(seed), zlib.crc32(slide_id.encode())])
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def slide_bags(model, info: Dict[str, Any], tables: Dict[str, Path], slide_ids: Sequence[str], cache_dir,
               options: SlideEvalOptions = SlideEvalOptions(), progress: bool = True,
               log=print) -> Dict[str, SlideBag]:
    """The `SlideBag` of each of ``slide_ids`` (through the feature cache in ``cache_dir``); a slide none of whose
    tiles can be read is left out, with a line."""
    from tqdm import tqdm

    from ..curation.embed import embedding_transform
    from ..data.datasets import DatasetSubset
    from ..eval.features import cached_features

    transform = embedding_transform(info)
    bags, hits = {}, 0
    for sid in tqdm(slide_ids, desc="slide embeddings", unit="slide", disable=not progress):
        dataset = WsiTileDataset(tables[sid], reader=options.reader)
        keep = capped_indices(len(dataset), options.max_tiles_per_slide, options.tile_seed, sid)
        try:
            features, hit = cached_features(model, info, DatasetSubset(dataset, keep), transform, cache_dir, sid,
                                            n_last_blocks=1, batch_size=options.batch_size, device=options.device,
                                            log=lambda *_: None)
        except RuntimeError as exc:  # no tile decoded
            log(f"[slide eval] slide {sid} left out: {exc}")
            continue
        hits += hit
        boxes = []
        for sample in features.paths:
            _, t = split_tile_sample(sample)
            boxes.append((t["x"], t["y"], t["level"], t["read"]))
        slide = split_tile_sample(dataset.samples[0][0])[0]
        bags[sid] = SlideBag(sid, slide, torch.nn.functional.normalize(features.cls[:, -1].float(), dim=1),
                             level0_boxes(slide, boxes, options.reader), len(dataset))
    log(f"[slide eval] embeddings of {len(bags)} slide(s) ({hits} from the cache in {cache_dir})")
    return bags


def level0_boxes(slide_path: str, boxes: Sequence[Tuple[int, int, int, int]], reader: str = "auto") -> np.ndarray:
    """(x, y, level, read) per tile -> (N, 3) int64 (x, y, level-0 side), the side from the slide's downsamples."""
    levels = {level for _, _, level, _ in boxes}
    downsamples = {0: 1.0}
    if levels - {0}:
        from .reader import open_slide

        with open_slide(slide_path, reader) as slide:
            downsamples = dict(enumerate(slide.level_downsamples))
    return np.asarray([(x, y, int(round(read * downsamples[level]))) for x, y, level, read in boxes],
                      np.int64).reshape(-1, 3)


# ------------------------------------------------------------------------------------------------ splits
def held_out_split(labels: SlideLabels, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, test) indices into ``labels.slide_ids``: stratified, seeded, whole patients when there are any."""
    from ..data.datasets import stratified_group_split, stratified_split

    if labels.patients is not None:
        return stratified_group_split(labels.labels, labels.patients, fraction, seed=seed)
    return stratified_split(labels.labels, fraction, seed=seed)


def fraction_subset(labels: SlideLabels, train: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices (into ``labels.slide_ids``) of the training slides of one label-fraction run."""
    from ..eval.splits import label_fraction_indices

    train_labels = [labels.labels[i] for i in train]
    groups = None if labels.patients is None else [labels.patients[i] for i in train]
    return np.asarray(train)[label_fraction_indices(train_labels, fraction, seed, groups)]


# ------------------------------------------------------------------------------------------------ runs
def bag_metrics(probabilities: Sequence[torch.Tensor], y_true: Sequence[int], classes: Sequence[str]) -> Dict:
    """The four report metrics (and the full `classification_metrics`) of MIL predictions on the test bags."""
    from ..eval.metrics import classification_metrics

    probs = torch.stack(list(probabilities)).numpy()
    full = classification_metrics(np.asarray(y_true), probs.argmax(1), probs, class_names=classes)
    headline = dict(roc_auc=full["macro_avg"]["roc_auc"], balanced_accuracy=full["balanced_accuracy"],
                    accuracy=full["accuracy"], macro_f1=full["macro_avg"]["f1"])
    return dict(headline, details=full)


def run_label_fractions(bags: Dict[str, SlideBag], labels: SlideLabels, train: np.ndarray, test: np.ndarray,
                        options: SlideEvalOptions = SlideEvalOptions(), log=print) -> Dict[str, Any]:
    """Every (fraction, seed) run; returns the runs, the summary per fraction and the attention on the test bags of
    the heatmap model (the largest fraction, 100% by default, and the first seed)."""
    from ..eval.mil import predict_mil, train_mil
    from ..eval.metrics import summarize_runs

    test_ids = [labels.slide_ids[i] for i in test]
    test_bags = [bags[s].embeddings for s in test_ids]
    y_test = [labels.labels[i] for i in test]
    runs, attention = [], None
    for fraction in options.fractions:
        for seed in options.seeds:
            chosen = fraction_subset(labels, train, float(fraction), int(seed))
            ids = [labels.slide_ids[i] for i in chosen]
            model = train_mil([bags[s].embeddings for s in ids], [labels.labels[i] for i in chosen],
                              n_classes=len(labels.classes), epochs=options.epochs, lr=options.lr, seed=int(seed))
            predicted = predict_mil(model, test_bags)
            result = bag_metrics(predicted["probabilities"], y_test, labels.classes)
            runs.append(dict(fraction=float(fraction), seed=int(seed), n_train_slides=len(ids), train_slides=ids,
                             probabilities={s: p.tolist() for s, p in zip(test_ids, predicted["probabilities"])},
                             **result))
            if attention is None and float(fraction) == max(map(float, options.fractions)):
                attention = dict(fraction=float(fraction), seed=int(seed),
                                 scores={s: a for s, a in zip(test_ids, predicted["attention"])},
                                 probabilities=dict(zip(test_ids, predicted["probabilities"])))
            log(f"[slide eval] {float(fraction):.0%} labels, seed {seed}: {len(ids)} training slides, "
                f"test AUC {fmt(result['roc_auc'])}, balanced acc. {fmt(result['balanced_accuracy'])}")
    summary = {}
    for fraction in options.fractions:
        chosen = [r for r in runs if r["fraction"] == float(fraction)]
        summary[f"{float(fraction):g}"] = dict(
            n_train_slides=sorted({r["n_train_slides"] for r in chosen}),
            **{key: summarize_runs([r[key] for r in chosen]) for key, _ in METRICS})
    return dict(runs=runs, summary=summary, attention=attention)


def fmt(value: Optional[float]) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def mean_std(stats: Dict[str, Any]) -> str:
    """``mean ± std`` (3 decimals) of a `summarize_runs` dict, ``n/a`` without a value."""
    if not stats.get("n"):
        return "n/a"
    return fmt(stats["mean"]) if stats["n"] == 1 else f"{fmt(stats['mean'])} ± {fmt(stats['std'])}"


# ------------------------------------------------------------------------------------------------ heatmaps
def slide_thumbnail(bag: SlideBag, tiles_dir: Optional[Path], options: SlideEvalOptions) -> Tuple[np.ndarray, float]:
    """(thumbnail RGB uint8, thumbnail pixels per level-0 pixel): the tiling's thumbnail when present."""
    from PIL import Image

    from .reader import open_slide

    with open_slide(bag.slide, options.reader) as slide:
        width = slide.level_dimensions[0][0]
        saved = None if tiles_dir is None else tiles_dir / f"{bag.slide_id}{THUMBNAIL_SUFFIX}"
        if saved is not None and saved.is_file():
            thumbnail = np.asarray(Image.open(saved).convert("RGB"))
        else:
            thumbnail = slide.thumbnail(options.thumbnail_size)
    return thumbnail, thumbnail.shape[1] / width


def attention_heatmap(thumbnail: np.ndarray, scale: float, boxes: np.ndarray, scores: Sequence[float],
                      alpha: float = 0.55) -> np.ndarray:
    """(h, w, 3) uint8: ``thumbnail`` with each tile's score (rescaled to 0-1 over the slide: min -> 0, max -> 1)
    painted in the 'inferno' colour map at its box (the highest score where tiles overlap); the rest unchanged."""
    from matplotlib import colormaps

    scores = np.asarray(scores, np.float64)
    span = scores.max() - scores.min() if scores.size else 0.0
    values = (scores - scores.min()) / span if span > 0 else np.ones_like(scores)
    heat = np.full(thumbnail.shape[:2], -1.0)
    h, w = heat.shape
    for (x, y, side), value in zip(boxes, values):
        x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
        x1, y1 = max(x0 + 1, int(np.ceil((x + side) * scale))), max(y0 + 1, int(np.ceil((y + side) * scale)))
        region = heat[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)]
        np.maximum(region, value, out=region)
    painted = heat >= 0
    colours = colormaps["inferno"](np.clip(heat, 0, 1))[..., :3] * 255.0
    out = thumbnail.astype(np.float64)
    out[painted] = (1 - alpha) * out[painted] + alpha * colours[painted]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_heatmaps(bags: Dict[str, SlideBag], attention: Dict[str, Any], tiles_dir: Optional[Path], out: Path,
                   options: SlideEvalOptions, log=print) -> Dict[str, str]:
    """``out/heatmaps/<id>.png`` per test slide of ``attention``; returns slide id -> path relative to ``out``."""
    from PIL import Image

    from ..files import write_atomic

    written = {}
    for sid, scores in sorted(attention["scores"].items()):
        bag = bags[sid]
        try:
            thumbnail, scale = slide_thumbnail(bag, tiles_dir, options)
        except Exception as exc:  # the slide moved since its tiles were embedded
            log(f"[slide eval] no heatmap for {sid}: {type(exc).__name__}: {exc}")
            continue
        picture = attention_heatmap(thumbnail, scale, bag.boxes, scores.numpy())
        relative = f"heatmaps/{sid}.png"
        write_atomic(out / relative, lambda tmp, p=picture: Image.fromarray(p).save(tmp, format="PNG"))
        written[sid] = relative
    return written


def shown_heatmaps(written: Dict[str, str], labels: SlideLabels, most: int) -> List[str]:
    """Up to ``most`` slide ids, taking the classes in turn (each in id order): a deterministic, mixed choice."""
    label_of = dict(zip(labels.slide_ids, labels.labels))
    queues = [[s for s in sorted(written) if label_of[s] == c] for c in range(len(labels.classes))]
    shown = []
    while len(shown) < most and any(queues):
        for queue in queues:
            if queue and len(shown) < most:
                shown.append(queue.pop(0))
    return shown


# ------------------------------------------------------------------------------------------------ report
def split_counts(labels: SlideLabels, train: np.ndarray, test: np.ndarray) -> Dict[str, Any]:
    """Slides per class (and patients) in the training and test splits."""
    out = {}
    for name, index in (("train", train), ("test", test)):
        values = [labels.labels[i] for i in index]
        out[name] = dict(slides=len(index), per_class={c: values.count(k) for k, c in enumerate(labels.classes)})
        if labels.patients is not None:
            out[name]["patients"] = len({labels.patients[i] for i in index})
    return out


def render_report(result: Dict[str, Any], heatmaps: Dict[str, str], shown: Sequence[str]) -> str:
    opts, counts = result["options"], result["splits"]
    lines = [f"# Slide-level evaluation: {result['backbone']['spec']}", "",
             f"Gated attention-MIL (Ilse et al. 2018, CLAM single-branch) on the L2-normalised final CLS embeddings "
             f"of each slide's tiles ({result['n_tiles']} tiles over {result['n_slides']} slides"
             + (f", at most {opts['max_tiles_per_slide']} per slide, seeded" if opts["max_tiles_per_slide"] else "")
             + f"), trained for {opts['epochs']} epochs (Adam, lr {opts['lr']:g}) on a fraction of the training "
             f"slides' labels and tested on held-out slides. Classes: {', '.join(result['classes'])}.", "",
             "| split | slides | " + " | ".join(result["classes"]) + " | patients |",
             "|---|---|" + "---|" * len(result["classes"]) + "---|"]
    for name in ("train", "test"):
        c = counts[name]
        lines.append(f"| {name} | {c['slides']} | " + " | ".join(str(c['per_class'][k]) for k in result["classes"])
                     + f" | {c.get('patients', 'n/a')} |")
    lines += ["", f"Test split: {opts['test_fraction']:.0%} of each class held out "
              f"({'whole patients' if result['patient_level'] else 'by slide'}, seed {opts['split_seed']}). "
              f"Label fractions: stratified subsets of the training slides"
              f"{' (whole patients)' if result['patient_level'] else ''}, one per seed "
              f"({', '.join(str(s) for s in opts['seeds'])}); mean ± std over the seeds. ROC-AUC is "
              f"{'binary' if len(result['classes']) == 2 else 'the macro mean of one-vs-rest AUCs'}.", "",
              "| labels | training slides | " + " | ".join(title for _, title in METRICS) + " |",
              "|---|---|" + "---|" * len(METRICS)]
    for fraction, row in result["summary"].items():
        n = "/".join(str(v) for v in row["n_train_slides"])
        lines.append(f"| {float(fraction):.0%} | {n} | " + " | ".join(mean_std(row[key]) for key, _ in METRICS) + " |")
    if result["notes"]:
        lines += [""] + [f"- {note}" for note in result["notes"]]
    if heatmaps:
        att = result["heatmap_model"]
        lines += ["", "## Attention heatmaps", "",
                  f"Tile attention of the {att['fraction']:.0%}-labels model (seed {att['seed']}) over each test "
                  f"slide's thumbnail (inferno: dark = lowest, yellow = highest score of that slide). "
                  f"{len(heatmaps)} written in `heatmaps/`; shown: {len(shown)}.", ""]
        for sid in shown:
            info = result["heatmap_slides"][sid]
            lines += [f"**{sid}**: true {info['label']}, predicted {info['predicted']} "
                      f"(p = {info['probability']:.2f})", "", f"![{sid}]({heatmaps[sid]})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ entry point
def evaluate_slides(backbone, tiles, labels_csv, out, options: SlideEvalOptions = SlideEvalOptions(),
                    cache_dir=None, progress: bool = True, log=print) -> Dict[str, Any]:
    """The whole evaluation (module doc) of ``backbone`` (a SPEC, or ``(model, info)``); writes ``out`` and returns
    what ``metrics.json`` holds, plus ``attention`` (the heatmap model's scores per test slide) and ``bags``."""
    from ..eval.backbone_spec import load_backbone
    from ..eval.report import write_json, write_text

    out, tiles = Path(out), Path(tiles)
    tables = tables_by_slide(tiles)
    labels = read_slide_labels(labels_csv, list(tables))
    notes = []
    unlabelled = sorted(set(tables) - set(labels.slide_ids))
    if unlabelled:
        notes.append(f"{len(unlabelled)} tiled slide(s) not in {Path(labels_csv).name}, left out: "
                     f"{', '.join(unlabelled[:10])}{' ...' if len(unlabelled) > 10 else ''}")
    empty = [s for s in labels.slide_ids if not read_table(tables[s])]
    if empty:
        raise ValueError(f"{len(empty)} labelled slide(s) have no tiles in their table (lower --min-tissue when "
                         f"tiling?): {', '.join(empty)}")
    model, info = load_backbone(backbone, options.device) if isinstance(backbone, str) else backbone
    bags = slide_bags(model, info, tables, labels.slide_ids, Path(cache_dir) if cache_dir else out / "embeddings",
                      options, progress, log)
    lost = [s for s in labels.slide_ids if s not in bags]
    if lost:
        notes.append(f"{len(lost)} slide(s) left out, no tile readable: {', '.join(lost)}")
        keep = [i for i, s in enumerate(labels.slide_ids) if s in bags]
        labels = SlideLabels([labels.slide_ids[i] for i in keep], [labels.labels[i] for i in keep], labels.classes,
                             None if labels.patients is None else [labels.patients[i] for i in keep])
    small = [c for k, c in enumerate(labels.classes) if labels.labels.count(k) < 2]
    if small:
        raise ValueError(f"class(es) {small} have fewer than 2 slides: nothing to both train and test on")
    train, test = held_out_split(labels, options.test_fraction, options.split_seed)
    results = run_label_fractions(bags, labels, train, test, options, log)
    heatmaps, heatmap_slides = {}, {}
    if results["attention"] is not None:
        heatmaps = write_heatmaps(bags, results["attention"], tiles if tiles.is_dir() else tiles.parent, out,
                                  options, log)
        label_of = dict(zip(labels.slide_ids, labels.labels))
        for sid, p in results["attention"]["probabilities"].items():
            k = int(p.argmax())
            heatmap_slides[sid] = dict(label=labels.classes[label_of[sid]], predicted=labels.classes[k],
                                       probability=float(p[k]), heatmap=heatmaps.get(sid))
    result = dict(backbone={k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))},
                  classes=labels.classes, n_slides=len(labels.slide_ids),
                  n_tiles=int(sum(len(bags[s].embeddings) for s in labels.slide_ids)),
                  patient_level=labels.patients is not None, options=asdict(options),
                  splits=split_counts(labels, train, test),
                  test_slides=[labels.slide_ids[i] for i in test], train_slides=[labels.slide_ids[i] for i in train],
                  summary=results["summary"], runs=results["runs"], notes=notes,
                  heatmap_model={k: results["attention"][k] for k in ("fraction", "seed")}
                  if results["attention"] else None, heatmap_slides=heatmap_slides)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result)
    shown = shown_heatmaps(heatmaps, labels, options.report_heatmaps)
    write_text(out / "report.md", render_report(result, heatmaps, shown))
    log(f"[slide eval] report: {out / 'report.md'}")
    return dict(result, attention=results["attention"], bags=bags)
