"""dinov2_repro: DINO/DINOv2 self-supervised pretraining, reimplemented and carried to brain-MRI classification.

Architecture, bottom up: data -> models (layers, ViT, heads) -> losses -> train (meta-arch, engine)
-> distributed -> eval, with a thin CLI (`dinov2-repro`) on top. Importing the package is cheap: heavy and
optional dependencies are imported where they are used.
"""

__version__ = "0.1.0"


def pretrain(config="demo_cpu", data=None, output_dir=None, iterations=0, overrides=(), resume=True):
    """Pretrain exactly as ``dinov2-repro train`` does: ``config`` is a preset name or a YAML file, ``data`` the
    images (``data.path``), ``iterations`` a short run with every schedule scaled to it, ``overrides`` more
    ``key=value`` strings. Returns the run summary (``run_dir``, ``export``, final losses, images/s, skipped files).
    """
    from .config import load_config
    from .train.engine import train

    flags = [f"data.path={data}"] if data else []
    flags += [f"train.iterations={int(iterations)}"] if iterations else []
    return train(load_config(config, flags + list(overrides)), output_dir=output_dir, resume=resume)


def evaluate(mode, backbone, data, output_dir=None, config=None, overrides=()):
    """``dinov2-repro eval MODE``: ``mode`` linear | knn | finetune, ``backbone`` any SPEC (a run directory, a
    .pth, ``random:...``), ``data`` labelled images. Returns the result dict (also in ``metrics.json``) with the
    report's path under ``report``."""
    from .eval.cli import default_output_dir
    from .eval.config import default_preset, load_eval_config
    from .eval.runner import evaluate as run

    cfg = load_eval_config(config or default_preset(mode), list(overrides))
    return run(mode, cfg, data, output_dir or default_output_dir(mode, str(backbone)), spec=str(backbone))


def predict(model, data, output="predictions.csv", device="auto"):
    """``dinov2-repro predict``: class probabilities of ``data`` (an image, a folder or a CSV) from the classifier
    that ``eval linear`` or ``eval finetune`` wrote (``model``: the file or the eval output folder). Writes
    ``output`` and returns `Predictions` (paths, probs (N, C), classes, skipped)."""
    from .eval.predict import predict as run

    return run(str(model), str(data), str(output), device)


def visualize(view, backbone, images, output_dir="viz", compare_random=False, **options):
    """``dinov2-repro viz VIEW``: ``view`` attention | pca, ``backbone`` a SPEC or a list of them, ``images`` a
    path or a list (files, folders, NIfTI/DICOM volumes). ``compare_random`` adds each backbone's random twin.
    Writes PNG grids and ``<view>.json`` under ``output_dir``; returns that summary. ``options``: see
    `dinov2_repro.viz.views.visualize` (size, block, mass, threshold, joint, max_images, ...)."""
    from .viz.views import visualize as run

    images = [images] if isinstance(images, (str, bytes)) or hasattr(images, "__fspath__") else list(images)
    return run(view, backbone, images, output_dir, compare_random=compare_random, **options)
