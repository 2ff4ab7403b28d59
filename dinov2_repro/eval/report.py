"""Write an evaluation's results: ``metrics.json``, a Markdown ``report.md`` and the PNG figures it embeds.

Figures use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), imported lazily.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..files import write_text_atomic

MODE_TITLES = {"linear": "Linear probe", "knn": "k-NN", "finetune": "Fine-tuning"}
SUMMARY_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro F1"),
                   ("macro_roc_auc", "macro ROC-AUC"), ("dedup_accuracy", "acc. w/o near-dups"))


def write_text(path: os.PathLike, text: str) -> None:
    """Text, atomically: a reader never sees half a file, and a crash leaves the old one."""
    write_text_atomic(path, text)


def write_json(path: os.PathLike, obj: Any) -> None:
    """JSON, atomically (NaN written as null so every reader accepts the file)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    write_text(path, json.dumps(clean(obj), indent=2))


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: os.PathLike,
                          title: str = "") -> None:
    """Counts with row-normalised colours (rows = true class)."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    rows = counts.sum(1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    size = 2.2 + 0.75 * len(classes)
    fig, (ax,) = _figure(size + 1.2, size)
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                    color="white" if fraction[i, j] > 0.5 else "black", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def plot_curves(curves: Dict[str, List[float]], path: os.PathLike, x_key: str, title: str = "",
                selected: Optional[float] = None) -> None:
    """Training / validation loss (left) and accuracy (right) against ``x_key`` (iteration or epoch), whole-number
    ticks, and the ``selected`` epoch (or iteration) marked."""
    from matplotlib.ticker import MaxNLocator

    x = curves[x_key]
    fig, (loss_ax, acc_ax) = _figure(10, 3.6, ncols=2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        if curves.get(key):
            loss_ax.plot(x, curves[key], marker=".", label=label)
    for key, label in (("train_accuracy", "train"), ("val_accuracy", "val")):
        if curves.get(key):
            acc_ax.plot(x, curves[key], marker=".", label=label)
    loss_ax.set_ylabel("cross-entropy")
    acc_ax.set_ylabel("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if selected is not None:
            ax.axvline(selected, color="red", linestyle=":", linewidth=1.2, label=f"selected ({x_key} {selected:g})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def plot_label_efficiency(summary: Dict[str, Dict[str, Any]], path: os.PathLike, title: str = "") -> None:
    """Test accuracy (mean +- std over seeds) against the fraction of training labels."""
    fractions = sorted(summary, key=float)
    means = [summary[f]["accuracy"]["mean"] for f in fractions]
    stds = [summary[f]["accuracy"]["std"] for f in fractions]
    fig, (ax,) = _figure(5.5, 3.6)
    ax.errorbar([float(f) for f in fractions], means, yerr=stds, marker="o", capsize=4)
    ax.set_xlabel("fraction of training labels")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


# ------------------------------------------------------------------------------------------------ markdown
def _pm(stats: Optional[Dict[str, Any]], percent: bool = True) -> str:
    if not stats or stats.get("n", 0) == 0 or stats.get("mean") is None or not math.isfinite(stats["mean"]):
        return "n/a"
    scale = 100.0 if percent else 1.0
    if stats["n"] == 1:
        return f"{stats['mean'] * scale:.2f}"
    return f"{stats['mean'] * scale:.2f} ± {stats['std'] * scale:.2f}"


def _num(value: Optional[float], percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value * 100:.2f}" if percent else f"{value:.3f}"


def _ci(interval: Optional[Sequence[float]], percent: bool = False) -> str:
    if not interval:
        return "n/a"
    return f"[{_num(interval[0], percent)}, {_num(interval[1], percent)}]"


def per_class_table(metrics: Dict[str, Any]) -> List[str]:
    recall_ci = (metrics.get("intervals") or {}).get("recall", {})
    lines = ["| class | sensitivity (recall) | 95% interval | specificity | precision | F1 | ROC-AUC | support |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {_num(row['recall'])} | {_ci(recall_ci.get(name))} | "
                     f"{_num(row.get('specificity'))} | {_num(row['precision'])} | {_num(row['f1'])} | "
                     f"{_num(row['roc_auc'])} | {row['support']} |")
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        row = metrics[key]
        lines.append(f"| *{label}* | {_num(row['recall'])} | | | {_num(row['precision'])} | {_num(row['f1'])} | "
                     f"{_num(row['roc_auc'])} | {metrics['n_samples']} |")
    return lines


def headline_with_intervals(metrics: Dict[str, Any]) -> str:
    """Accuracy, balanced accuracy and macro-F1 with their bootstrap intervals, and the calibration error."""
    ci = metrics.get("intervals") or {}
    text = (f"Test: accuracy **{_num(metrics['accuracy'], True)}%** {_ci(ci.get('accuracy'), True)}, balanced "
            f"accuracy {_num(metrics['balanced_accuracy'], True)}% {_ci(ci.get('balanced_accuracy'), True)}, macro-F1 "
            f"{_num(metrics['macro_avg']['f1'], True)}% {_ci(ci.get('macro_f1'), True)}, on {metrics['n_samples']} "
            f"images (95% percentile-bootstrap intervals over the test images, {ci.get('n_resamples', 0)} resamples).")
    if metrics.get("calibration"):
        text += (f" Expected calibration error {_num(metrics['calibration']['ece'], True)}% "
                 f"({metrics['calibration']['n_bins']} confidence bins; the reliability diagram below).")
    return text


def plot_reliability(calibration: Dict[str, Any], path: os.PathLike, title: str = "") -> None:
    """Accuracy against mean top-class confidence per bin (the diagonal is perfect calibration), with counts."""
    bins = [b for b in calibration["bins"] if b["count"]]
    width = 1.0 / calibration["n_bins"]
    fig, (ax,) = _figure(4.6, 4.2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    ax.bar([b["low"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", alpha=0.7,
           edgecolor="black", label="accuracy per confidence bin")
    for b in bins:
        ax.text(b["low"] + width / 2, min(b["accuracy"] + 0.02, 0.97), str(b["count"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("top-class confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{title}\nECE {calibration['ece'] * 100:.2f}% (numbers: images per bin)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _ties(sel: Dict[str, Any], what: str) -> str:
    tied = sel.get("n_tied", 1)
    return (f" {tied} {what} tied at the best validation accuracy; the tie was broken by {sel['tie_break']}."
            if tied > 1 else "")


def _selection_lines(mode: str, run: Dict[str, Any]) -> List[str]:
    sel = run["selection"]
    if mode == "linear":
        lines = [f"Selected on the validation split: **{sel['features']}, lr {sel['lr']:g}** "
                 f"(val accuracy {_num(sel['val_accuracy'], True)}%, {sel['n_heads']} heads trained for "
                 f"{sel['iterations']} iterations).{_ties(sel, 'heads')}", "", "Best heads on the validation split:",
                 "",
                 "| features | lr | val accuracy | val loss |", "|---|---|---|---|"]
        table = sorted(sel["table"], key=lambda r: (-r["val_accuracy"], r["val_loss"]))[:8]
        lines += [f"| {r['features']} | {r['lr']:g} | {_num(r['val_accuracy'], True)} | {r['val_loss']:.4f} |"
                  for r in table]
        return lines
    if mode == "knn":
        accs = ", ".join(f"k={k}: {_num(a, True)}%" for k, a in sel["val_accuracy_per_k"].items())
        return [f"Selected on the validation split: **k = {sel['k']}** (T = {sel['temperature']}); "
                f"validation accuracy per k: {accs}.{_ties(sel, 'values of k')}"]
    return [f"Best epoch on the validation split: **{sel['best_epoch']}** of {sel['epochs_run']} run "
            f"(val accuracy {_num(sel['val_accuracy'], True)}%, peak lr {sel['peak_lr']:.3g}); "
            f"checkpoint: `{sel.get('checkpoint') or 'not saved'}`."]


def group_lines(groups: Optional[Dict[str, List[str]]], most: int = 20) -> List[str]:
    """The groups (patients or volumes) of each split by name, the first ``most`` and a count of the rest."""
    if not groups:
        return []
    lines = ["Groups (patients or volumes) per split, all of them in `metrics.json`:", ""]
    for split in ("train", "val", "test"):
        names = list(groups.get(split, []))
        more = f", ... and {len(names) - most} more" if len(names) > most else ""
        lines.append(f"- {split} ({len(names)}): " + ", ".join(f"`{n}`" for n in names[:most]) + more)
    return lines + [""]


def dedup_lines(dedup: Optional[Dict[str, Any]]) -> List[str]:
    """The near-duplicate lines of the report (none when the check was off)."""
    if not dedup:
        return []
    lines = [f"Near-duplicates: {dedup['n_duplicates']} of {dedup['n_test']} test images have a training image "
             f"within {dedup['max_distance']} bits (256-bit difference hash).", ""]
    if dedup.get("embedding"):
        e = dedup["embedding"]
        lines += [f"Embedding copies: {e['n_duplicates']} of {dedup['n_test']} test images have a training image at "
                  f"CLS cosine >= {e['min_cosine']} (`curate dedup`'s copy detection; counted, not removed above; "
                  f"highest cosine {e['max_cosine']}).", ""]
    return lines


def attention_panel_lines(figure: str) -> List[str]:
    return ["## Where the backbone looks", "",
            "CLS attention of the backbone's last block (mean over heads; outlined: the fewest patches holding "
            "60% of it) on test images of each class, one classified correctly and one wrongly where there "
            "is one (first by path). For fine-tuning, the backbone before fine-tuning. More images: "
            "`dinov2-repro viz attention --backbone SPEC --images ... --compare random`.", "",
            f"![Attention on test images]({figure})", ""]


def render_markdown(result: Dict[str, Any], figures: Dict[str, str]) -> str:
    mode = result["mode"]
    info = result["backbone"]
    data = result["data"]
    lines = [f"# {MODE_TITLES[mode]} of `{info['spec']}`", ""]
    arch = ", ".join(f"{k} {info[k]}" for k in ("arch_name", "embed_dim", "depth", "num_heads", "patch_size")
                     if info.get(k) is not None)
    lines += [f"- Backbone: `{info['spec']}` ({info.get('source')}; {arch}; {info.get('n_params', 0) / 1e6:.2f}M "
              f"parameters; weights sha1 `{str(info.get('weights_sha1'))[:12]}`)",
              f"- Data: `{data['path']}`; classes: {', '.join(data['classes'])}",
              f"- Preprocessing: {result['preprocessing']}",
              f"- Device: {result['device']}; wall time {result['seconds']:.1f} s", ""]
    if data["notes"]:
        lines += ["**Notes on the data:**", ""] + [f"- {note}" for note in data["notes"]] + [""]
    lines += ["| split | " + " | ".join(data["classes"]) + " | total | source |",
              "|---|" + "---|" * (len(data["classes"]) + 2)]
    for split in ("train", "val", "test"):
        counts = data["counts"][split]
        lines.append(f"| {split} | " + " | ".join(str(counts[c]) for c in data["classes"]) +
                     f" | {sum(counts.values())} | {data['source'].get(split, '')} |")
    lines += [""] + group_lines(data.get("groups"))
    lines += ["Every choice (learning rate, feature set, k, epoch) is made on the validation split; the test "
              "split is only scored once, with the chosen model.", ""]
    lines += ["## Test results", "",
              "| train labels | n train | seeds | " + " | ".join(t for _, t in SUMMARY_METRICS) + " |",
              "|---|---|---|" + "---|" * len(SUMMARY_METRICS)]
    for fraction, stats in sorted(result["summary"].items(), key=lambda kv: -float(kv[0])):
        lines.append(f"| {float(fraction):.0%} | {stats['n_train']} | {stats['accuracy']['n']} | " +
                     " | ".join(_pm(stats.get(key)) for key, _ in SUMMARY_METRICS) + " |")
    lines += ["", "Values in % (ROC-AUC x 100): mean ± sample std over seeds. *acc. w/o near-dups* = accuracy on "
              "the test images with no near-duplicate (difference hash) among the training images.", ""]
    lines += dedup_lines(result.get("dedup"))
    main = result["runs"][result["main_run"]]
    lines += [f"## Main run (train fraction {main['fraction']:.0%}, seed {main['seed']}, {main['n_train']} "
              f"training images)", ""]
    lines += _selection_lines(mode, main) + [""]
    lines += [headline_with_intervals(main["test"]), ""]
    if main["test"]["absent_classes"]:
        lines += [f"Classes absent from the test split (no recall / ROC-AUC): {main['test']['absent_classes']}", ""]
    lines += per_class_table(main["test"]) + [""]
    for key, caption in (("confusion_matrix", "Confusion matrix (test)"), ("reliability", "Reliability diagram (test)"),
                         ("curves", "Training curves"), ("label_efficiency", "Label efficiency")):
        if key in figures:
            lines += [f"![{caption}]({figures[key]})", ""]
    if main.get("skipped"):
        lines += [f"Unreadable images left out: {main['skipped']}", ""]
    if "attention_panel" in figures:
        lines += attention_panel_lines(figures["attention_panel"])
    lines += ["## Files", "", "- `metrics.json`: every run's metrics, selections and curves; `config.yaml`: the "
              "resolved eval config; `splits.json`: the images of each split; `predictions.csv`: every test "
              "image's label, prediction and class probabilities."]
    return "\n".join(lines) + "\n"


def write_report(output_dir: os.PathLike, result: Dict[str, Any]) -> Path:
    """metrics.json + figures + report.md under ``output_dir``; returns the report path."""
    output_dir = Path(output_dir)
    figures: Dict[str, str] = {}
    main = result["runs"][result["main_run"]]
    spec = str(result["backbone"]["spec"])
    title = f"{MODE_TITLES[result['mode']]}: {spec if len(spec) <= 48 else '...' + spec[-45:]}"
    plot_confusion_matrix(main["test"]["confusion_matrix"], main["test"]["classes"],
                          output_dir / "confusion_matrix.png", title=f"{title}\n(test split)")
    figures["confusion_matrix"] = "confusion_matrix.png"
    if main["test"].get("calibration"):
        plot_reliability(main["test"]["calibration"], output_dir / "reliability.png", title=f"{title} (test split)")
        figures["reliability"] = "reliability.png"
    curves = main.get("curves") or {}
    x_key = "iteration" if "iteration" in curves else "epoch"
    if curves.get(x_key):
        selected = main["selection"].get("best_epoch") if x_key == "epoch" else None
        plot_curves(curves, output_dir / "curves.png", x_key, title=title, selected=selected)
        figures["curves"] = "curves.png"
    if result.get("attention_panel"):  # drawn by the runner, which holds the backbone and the test images
        figures["attention_panel"] = result["attention_panel"]
    if len(result["summary"]) > 1:
        plot_label_efficiency(result["summary"], output_dir / "label_efficiency.png", title=title)
        figures["label_efficiency"] = "label_efficiency.png"
    result = dict(result, figures=figures)
    write_json(output_dir / "metrics.json", result)
    path = output_dir / "report.md"
    path.write_text(render_markdown(result, figures))
    return path
