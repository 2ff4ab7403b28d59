"""One evaluation end to end: backbone -> splits -> (cached features) -> protocol runs -> metrics and report.

`evaluate(mode, cfg, data_path, output_dir, spec=... | backbone=(module, info))` is the Python entry point the CLI
and the demo call. Passing ``backbone=`` injects any module (a ViT, or anything mapping images (B, 3, H, W) to
features (B, D)); `evaluate_features` runs the linear probe or k-NN on ready-made `FeatureSet`s.

Label efficiency: every (train fraction, seed) pair is one run on a stratified, seeded subset of the training split
(`stratified_subset`); validation and test splits never change. The report gives mean ± std over seeds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .features import FeatureSet
from .metrics import classification_metrics, summarize_runs


class _Log:
    """print() and append to <output_dir>/eval.log."""

    def __init__(self, path: Optional[Path], echo: bool = True):
        self.path, self.echo = path, echo

    def __call__(self, message: str) -> None:
        if self.echo:
            print(message, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(message + "\n")


# ------------------------------------------------------------------------------------------------ per-run helpers
def _metrics_with_dedup(labels: torch.Tensor, probs: torch.Tensor, classes: Sequence[str], paths: Sequence[str],
                        duplicate_paths: Optional[set]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    preds = probs.argmax(1)
    test = classification_metrics(labels, preds, probs, classes)
    dedup = None
    if duplicate_paths is not None:
        keep = torch.tensor([p not in duplicate_paths for p in paths], dtype=torch.bool)
        if keep.any():
            dedup = classification_metrics(labels[keep], preds[keep], probs[keep], classes)
            dedup["n_removed"] = int((~keep).sum())
    return test, dedup


def _predictions(paths: Sequence[str], labels: torch.Tensor, probs: torch.Tensor) -> Dict[str, list]:
    """Per-image test predictions, kept so that two backbones can be compared image by image (paired)."""
    return dict(paths=list(paths), labels=[int(y) for y in labels.tolist()],
                predicted=[int(y) for y in probs.argmax(1).tolist()], probs=probs.tolist())


def _write_predictions(path: Path, runs: List[Dict[str, Any]], predictions: List[Dict[str, list]],
                       classes: Sequence[str]) -> None:
    """``predictions.csv``: one row per (run, test image): fraction, seed, path, label, predicted, correct, and
    the probability of every class (``p_<class>``)."""
    import csv
    import io

    from .report import write_text

    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fraction", "seed", "path", "label", "predicted", "correct", *(f"p_{c}" for c in classes)])
    for run, pred in zip(runs, predictions):
        for p, y, yhat, probs in zip(pred["paths"], pred["labels"], pred["predicted"], pred["probs"]):
            writer.writerow([f"{run['fraction']:g}", run["seed"], p, classes[y], classes[yhat], int(y == yhat),
                             *(f"{v:.6g}" for v in probs)])
    write_text(path, buffer.getvalue())


def fraction_of_train(train: FeatureSet, fraction: float, seed: int,
                      groups: Optional[Dict[str, str]] = None) -> FeatureSet:
    """The training features of one label fraction; with ``groups`` (path -> patient) whole patients at a time."""
    from .splits import label_fraction_indices

    names = [groups.get(p, p) for p in train.paths] if groups else None
    return train.subset(label_fraction_indices(train.labels.tolist(), fraction, seed, names))


def linear_run(features: Dict[str, FeatureSet], classes: Sequence[str], cfg, fraction: float, seed: int, *,
               device: Any = "cpu", duplicate_paths: Optional[set] = None, progress: bool = False,
               groups: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """One linear-probe run: train every head on a subset of train, select on val, score the selected on test."""
    from .linear import train_linear_probe

    train = fraction_of_train(features["train"], fraction, seed, groups)
    probe = train_linear_probe(train, features["val"], len(classes), cfg.linear, seed=seed, device=device,
                               progress=progress)
    c, i = probe.best
    choice = probe.choices[c]
    val_probs = probe.predict_proba(features["val"], c, i)
    test_probs = probe.predict_proba(features["test"], c, i)  # the test split sees the selected head only
    test, dedup = _metrics_with_dedup(features["test"].labels, test_probs, classes, features["test"].paths,
                                      duplicate_paths)
    return dict(
        fraction=fraction, seed=seed, n_train=len(train),
        selection=dict(features=choice.name, n_blocks=choice.n_blocks, avgpool=choice.avgpool,
                       lr=probe.learning_rates[i], val_accuracy=float(probe.val_accuracy[c, i]),
                       val_loss=float(probe.val_loss[c, i]), n_heads=len(probe.choices) * len(probe.learning_rates),
                       n_tied=int((probe.val_accuracy == probe.val_accuracy.max()).sum()),
                       tie_break="lowest validation loss, then the first in the grid",
                       iterations=probe.iterations, table=probe.selection_table()),
        val=classification_metrics(features["val"].labels, val_probs.argmax(1), val_probs, classes),
        test=test, test_dedup=dedup, curves=probe.curves, probe=probe,
        test_predictions=_predictions(features["test"].paths, features["test"].labels, test_probs))


def knn_run(features: Dict[str, FeatureSet], classes: Sequence[str], cfg, fraction: float, seed: int, *,
            device: Any = "cpu", duplicate_paths: Optional[set] = None, progress: bool = False,
            groups: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """One k-NN run: the training subset is the memory bank; k chosen on val; the chosen k scored on test."""
    from .knn import effective_ks, knn_probabilities, select_k

    train = fraction_of_train(features["train"], fraction, seed, groups)
    ks = effective_ks(cfg.knn.ks, len(train))
    bank = train.knn_input().to(device)
    common = dict(n_classes=len(classes), temperature=float(cfg.knn.temperature), chunk_size=int(cfg.knn.chunk_size),
                  backend=cfg.knn.backend)
    val_probs = knn_probabilities(bank, train.labels, features["val"].knn_input().to(device), ks, **common)
    k, val_accuracy = select_k(val_probs, features["val"].labels)
    test_probs = knn_probabilities(bank, train.labels, features["test"].knn_input().to(device), [k], **common)[k]
    test, dedup = _metrics_with_dedup(features["test"].labels, test_probs, classes, features["test"].paths,
                                      duplicate_paths)
    return dict(
        fraction=fraction, seed=seed, n_train=len(train),
        selection=dict(k=k, temperature=float(cfg.knn.temperature), ks_requested=list(cfg.knn.ks), ks=ks,
                       val_accuracy=val_accuracy[k], val_accuracy_per_k=val_accuracy, backend=cfg.knn.backend,
                       n_tied=sum(a == val_accuracy[k] for a in val_accuracy.values()), tie_break="the smallest k"),
        val=classification_metrics(features["val"].labels, val_probs[k].argmax(1), val_probs[k], classes),
        test=test, test_dedup=dedup, curves={},
        test_predictions=_predictions(features["test"].paths, features["test"].labels, test_probs))


def summarize(runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per train fraction: mean/std over seeds of the headline test metrics."""
    out: Dict[str, Dict[str, Any]] = {}
    for fraction in sorted({r["fraction"] for r in runs}, reverse=True):
        group = [r for r in runs if r["fraction"] == fraction]
        out[f"{fraction:g}"] = dict(
            n_train=group[0]["n_train"],
            seeds=[r["seed"] for r in group],
            accuracy=summarize_runs([r["test"]["accuracy"] for r in group]),
            balanced_accuracy=summarize_runs([r["test"]["balanced_accuracy"] for r in group]),
            macro_f1=summarize_runs([r["test"]["macro_avg"]["f1"] for r in group]),
            macro_roc_auc=summarize_runs([r["test"]["macro_avg"]["roc_auc"] for r in group]),
            dedup_accuracy=summarize_runs([r["test_dedup"]["accuracy"] for r in group if r.get("test_dedup")]),
            val_accuracy=summarize_runs([r["selection"]["val_accuracy"] for r in group]),
        )
    return out


def _main_run_index(runs: List[Dict[str, Any]], seeds: Sequence[int]) -> int:
    top = max(r["fraction"] for r in runs)
    for i, r in enumerate(runs):
        if r["fraction"] == top and r["seed"] == seeds[0]:
            return i
    return 0


def evaluate_features(mode: str, features: Dict[str, FeatureSet], classes: Sequence[str], cfg, *,
                      device: Any = "cpu", duplicate_paths: Optional[set] = None,
                      log: Callable[[str], None] = print,
                      groups: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Linear probe or k-NN on ready-made features (``{"train", "val", "test"}``) for every fraction x seed;
    ``groups`` (path -> patient) makes the label fractions take whole patients."""
    run = {"linear": linear_run, "knn": knn_run}[mode]
    runs = []
    for fraction in cfg.train_fractions:
        for seed in cfg.seeds:
            result = run(features, classes, cfg, float(fraction), int(seed), device=device,
                         duplicate_paths=duplicate_paths, progress=bool(cfg.progress), groups=groups)
            log(f"[{mode}] fraction {fraction:g} seed {seed}: n_train {result['n_train']}, selected "
                f"{_selection_text(mode, result['selection'])}, val acc {result['selection']['val_accuracy']:.4f}, "
                f"test acc {result['test']['accuracy']:.4f}")
            runs.append(result)
    return runs


def _selection_text(mode: str, selection: Dict[str, Any]) -> str:
    tied = selection.get("n_tied", 1)
    ties = f" ({tied} tied at the best validation accuracy; chosen by {selection['tie_break']})" if tied > 1 else ""
    if mode == "linear":
        return f"{selection['features']} lr {selection['lr']:g}{ties}"
    if mode == "knn":
        return f"k={selection['k']}{ties}"
    return f"epoch {selection['best_epoch']}"


MIN_VAL_PER_CLASS, MIN_VAL = 10, 50  # below these, one validation image moves the selection metric by > 2 points


def small_validation_warning(counts: Dict[str, Dict[str, int]]) -> Optional[str]:
    """A warning when the validation split is too small to choose heads, k or an epoch reliably."""
    val = counts["val"]
    total = sum(val.values())
    if total >= MIN_VAL and min(val.values(), default=0) >= MIN_VAL_PER_CLASS:
        return None
    return (f"the validation split is small ({total} images; per class {val}): one image moves validation "
            f"accuracy by {100 / max(total, 1):.1f} points, so several heads or k may tie and the choice is noisy; "
            f"raise data.val_fraction or give a larger validation split (wanted: >= {MIN_VAL} images, "
            f">= {MIN_VAL_PER_CLASS} per class)")


# ------------------------------------------------------------------------------------------------ entry point
def evaluate(mode: str, cfg, data_path, output_dir, *, spec: Optional[str] = None,
             backbone: Optional[Tuple[Any, Dict[str, Any]]] = None, echo: bool = True) -> Dict[str, Any]:
    """Run ``mode`` ("linear" | "knn" | "finetune") and write metrics.json, report.md, figures under output_dir.

    Give either ``spec`` (see `backbone_spec`) or ``backbone=(module, info)`` (``info`` from `load_backbone` or
    `describe_module`). Returns the result dict (also in metrics.json) with ``report`` = the report path.
    """
    from .backbone_spec import environment_device, load_backbone
    from .splits import build_eval_splits

    if mode not in ("linear", "knn", "finetune"):
        raise ValueError(f"unknown evaluation mode {mode!r}")
    if (spec is None) == (backbone is None):
        raise ValueError("give exactly one of spec= or backbone=")
    start = time.perf_counter()
    output_dir = Path(output_dir)
    splits = build_eval_splits(data_path, cfg.data)  # a bad --data fails before any loading or writing
    device = environment_device(cfg.device)
    if backbone is None:
        if echo:
            print(f"[{mode}] loading backbone {spec}", flush=True)
        model, info = load_backbone(spec, device)
    else:
        model, info = backbone
        model = model.to(device).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    log = _Log(output_dir / "eval.log", echo)
    try:
        return _evaluate(mode, cfg, data_path, output_dir, splits, model, info, device, log, start)
    except Exception as exc:  # the log says why the run stopped, not only the terminal
        log(f"[{mode}] error: {type(exc).__name__}: {exc}")
        raise


def _embedding_copies(features, min_cosine: float, backend: str) -> Dict[str, Any]:
    """Test images whose final CLS token has cosine >= ``min_cosine`` with a train or val image's."""
    from .dedup import embedding_near_duplicates

    reference = torch.cat([features["train"].knn_input(), features["val"].knn_input()])
    is_dup, cosine = embedding_near_duplicates(reference, features["test"].knn_input(), min_cosine, backend)
    paths = sorted(p for p, d in zip(features["test"].paths, is_dup.tolist()) if d)
    return dict(min_cosine=min_cosine, n_duplicates=len(paths), duplicates=paths,
                max_cosine=round(float(cosine.max()), 4) if len(cosine) else None)


def _evaluate(mode: str, cfg, data_path, output_dir: Path, splits, model, info: Dict[str, Any], device, log,
              start: float) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    from .dedup import cached_image_hashes, near_duplicates
    from .features import EvalTransform, cached_features, default_cache_dir, resolve_sizes
    from ..viz.panel import safe_attention_panel
    from .report import write_json, write_report

    log(f"[{mode}] backbone {info.get('spec')}")
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    _record_splits(splits, data_path, output_dir, log)
    resize, crop, mean, std = resolve_sizes(cfg.data, info)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "features"  # shared by content
    workers = int(cfg.data.num_workers)

    if mode in ("linear", "knn"):
        transform = EvalTransform(resize, crop, mean, std)
        features = {}
        for name in ("train", "val", "test"):
            features[name], _ = cached_features(
                model, info, getattr(splits, name), transform, cache_dir, name,
                n_last_blocks=int(cfg.features.n_last_blocks), batch_size=int(cfg.data.batch_size),
                num_workers=workers, device=device, precision=cfg.features.precision, progress=bool(cfg.progress),
                log=log)
        duplicate_paths = embedding_copies = None
        if cfg.data.dedup_test:
            reference = torch.cat([features["train"].dhash, features["val"].dhash])
            is_dup, _ = near_duplicates(reference, features["test"].dhash, int(cfg.data.dedup_max_distance))
            duplicate_paths = {p for p, d in zip(features["test"].paths, is_dup.tolist()) if d}
            embedding_copies = _embedding_copies(features, float(cfg.data.dedup_cosine), str(cfg.knn.backend))
        runs = evaluate_features(mode, features, splits.classes, cfg, device=device, duplicate_paths=duplicate_paths,
                                 log=log, groups=splits.groups)
        skipped = sorted({p for f in features.values() for p in f.skipped})
    else:
        duplicate_paths = embedding_copies = None  # fine-tuning extracts no frozen features to compare
        if cfg.data.dedup_test:
            hashes = {name: cached_image_hashes(getattr(splits, name), cache_dir, name, workers, bool(cfg.progress))
                      for name in ("train", "val", "test")}
            is_dup, _ = near_duplicates(torch.cat([hashes["train"][0], hashes["val"][0]]), hashes["test"][0],
                                        int(cfg.data.dedup_max_distance),
                                        torch.cat([hashes["train"][1], hashes["val"][1]]), hashes["test"][1])
            duplicate_paths = {p for (p, _), d in zip(splits.test.samples, is_dup.tolist()) if d}
        runs, skipped = _finetune_runs(model, info, splits, cfg, output_dir, device=device, crop=crop, resize=resize,
                                       mean=mean, std=std, duplicate_paths=duplicate_paths, log=log)
    dedup_info = _dedup_summary(duplicate_paths, embedding_copies, len(splits.test), cfg, log)
    if mode == "linear":  # the main run's selected head, loadable by `dinov2-repro predict`
        from .classifier import CLASSIFIER_FILE, save_linear_classifier

        probe = runs[_main_run_index(runs, list(cfg.seeds))]["probe"]
        save_linear_classifier(output_dir / CLASSIFIER_FILE, probe, *probe.best, info, splits.classes,
                               dict(resize_size=resize, crop_size=crop, mean=mean, std=std))
    predictions = [r.pop("test_predictions") for r in runs]  # in predictions.csv, not in metrics.json
    _write_predictions(output_dir / "predictions.csv", runs, predictions, splits.classes)
    for r in runs:
        r.pop("probe", None)
        if skipped:
            r["skipped"] = skipped
    result = dict(
        mode=mode, backbone=info, device=str(device), seconds=time.perf_counter() - start,
        preprocessing=dict(resize_size=resize, crop_size=crop, mean=mean, std=std),
        data=dict(path=str(data_path), **splits.describe()), dedup=dedup_info,
        config=OmegaConf.to_container(cfg, resolve=True), train_fractions=list(cfg.train_fractions),
        seeds=list(cfg.seeds), runs=runs, summary=summarize(runs), main_run=_main_run_index(runs, list(cfg.seeds)))
    result["attention_panel"] = safe_attention_panel(model, info, splits.test, predictions[result["main_run"]],
                                                     splits.classes, output_dir, crop, mean, std, resize, log=log)
    report = write_report(output_dir, result)
    result["report"] = str(report)
    result["test_predictions"] = predictions[result["main_run"]]  # returned for paired comparisons, not saved twice
    write_json(output_dir / "summary.json", dict(mode=mode, spec=info.get("spec"), summary=result["summary"],
                                                  main=_headline(result), report=str(report)))
    log(f"[{mode}] report: {report}")
    return result


def _record_splits(splits, data_path, output_dir: Path, log) -> None:
    """Log the split notes and sizes, and write ``splits.json`` (every sample with its class)."""
    from .report import write_json

    for note in splits.notes:
        log(f"[data] NOTE: {note}")
    counts = splits.counts()
    warning = small_validation_warning(counts)
    if warning:
        log(f"[data] WARNING: {warning}")
    log(f"[data] {data_path}: classes {splits.classes}; train {sum(counts['train'].values())}, "
        f"val {sum(counts['val'].values())}, test {sum(counts['test'].values())} images")
    write_json(output_dir / "splits.json", dict(
        classes=splits.classes, notes=splits.notes, source=splits.source,
        **{name: [[p, splits.classes[y]] for p, y in getattr(splits, name).samples] for name in ("train", "val", "test")}))


def _dedup_summary(duplicate_paths, embedding_copies, n_test: int, cfg, log) -> Optional[Dict[str, Any]]:
    """The report's near-duplicate section (None when the check was off), logged."""
    if duplicate_paths is None:
        return None
    log(f"[data] {len(duplicate_paths)} of {n_test} test images have a near-duplicate in train/val "
        f"(difference hash within {cfg.data.dedup_max_distance} bits)")
    if embedding_copies is not None:
        log(f"[data] {embedding_copies['n_duplicates']} test images have a training image at CLS cosine >= "
            f"{embedding_copies['min_cosine']} (embedding copy detection, reported only)")
    return dict(n_test=n_test, n_duplicates=len(duplicate_paths), max_distance=int(cfg.data.dedup_max_distance),
                duplicates=sorted(duplicate_paths), embedding=embedding_copies)


def _headline(result: Dict[str, Any]) -> Dict[str, Any]:
    main = result["runs"][result["main_run"]]
    return dict(fraction=main["fraction"], seed=main["seed"], test_accuracy=main["test"]["accuracy"],
                test_balanced_accuracy=main["test"]["balanced_accuracy"],
                val_accuracy=main["selection"]["val_accuracy"], selection=_selection_text(result["mode"],
                                                                                            main["selection"]))


def _finetune_runs(model, info, splits, cfg, output_dir: Path, *, device, crop, resize, mean, std, duplicate_paths,
                   log) -> Tuple[List[Dict[str, Any]], List[str]]:
    from ..data.datasets import DatasetSubset
    from .finetune import image_loader, predict, run_finetune
    from .splits import label_fraction_indices

    classes = splits.classes
    runs, skipped = [], set()
    train_labels = [y for _, y in splits.train.samples]
    train_groups = [splits.groups[p] for p, _ in splits.train.samples] if splits.groups else None
    for fraction in cfg.train_fractions:
        for seed in cfg.seeds:
            subset = label_fraction_indices(train_labels, float(fraction), int(seed), train_groups)
            train_set = DatasetSubset(splits.train, subset)  # decoded by the split's dataset (volume slices too)
            run_dir = output_dir / "runs" / f"fraction{float(fraction):g}_seed{seed}"
            out = run_finetune(model, info, train_set, splits.val, len(classes), cfg.finetune, crop_size=crop,
                               resize_size=resize, mean=mean, std=std, seed=int(seed), device=device,
                               batch_size_eval=int(cfg.data.batch_size), num_workers=int(cfg.data.num_workers),
                               checkpoint_path=run_dir / "best.pth", progress=bool(cfg.progress), log=log)
            scored = {}
            for name in ("val", "test"):
                dataset = getattr(splits, name)
                loader = image_loader(dataset, out["eval_transform"], int(cfg.data.batch_size), False,
                                 int(cfg.data.num_workers), int(seed), device)
                probs, labels, kept, failed = predict(out["model"], loader, device, cfg.finetune.precision)
                skipped.update(dataset.samples[i][0] for i in failed)
                scored[name] = (probs, labels, [dataset.samples[i][0] for i in kept])
            test, dedup = _metrics_with_dedup(scored["test"][1], scored["test"][0], classes, scored["test"][2],
                                              duplicate_paths)
            val_probs, val_labels, _ = scored["val"]
            result = dict(
                fraction=float(fraction), seed=int(seed), n_train=len(train_set),
                selection=dict(best_epoch=out["best_epoch"], epochs_run=out["epochs_run"],
                               val_accuracy=out["val_accuracy"], val_loss=out["val_loss"], peak_lr=out["peak_lr"],
                               steps=out["steps"], checkpoint=out["checkpoint"], seconds=out["seconds"],
                               train_transform=out["train_transform"], n_skipped_train=out["n_skipped_train"]),
                val=classification_metrics(val_labels, val_probs.argmax(1), val_probs, classes),
                test=test, test_dedup=dedup, curves=out["curves"],
                test_predictions=_predictions(scored["test"][2], scored["test"][1], scored["test"][0]))
            log(f"[finetune] fraction {fraction:g} seed {seed}: best epoch {out['best_epoch']}, val acc "
                f"{out['val_accuracy']:.4f}, test acc {test['accuracy']:.4f}")
            runs.append(result)
            del out
    return runs, sorted(skipped)
