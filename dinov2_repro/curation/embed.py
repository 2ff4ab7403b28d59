"""``curate embed``: L2-normalised CLS embeddings of every image (or volume slice) of a dataset, in fp16 shards.

Output folder::

    params.json              what was embedded, with which backbone and transform (a resume must match it)
    shards/emb_00000.npy     float16 (n_ok, D), unit-norm rows, for samples [s * shard_size, (s+1) * shard_size)
    shards/rows_00000.csv    sample, path, label, sha1 of each row of the shard (sha1 of the decoded pixels)
    shards/done_00000.json   written last: the shard is complete (counts, unreadable files)
    index.csv                row, sample, path, label, sha1 of every embedding (written once all shards are done)
    skipped.txt              the unreadable files, one per line

A shard whose ``done`` file exists is never recomputed, so a killed run resumes where it stopped. Under torchrun
(or srun) rank r of w embeds the shards s with s % w == r; no process group is needed, and the last rank to
finish writes ``index.csv``. The sha1 of the decoded pixels is the exact-duplicate key of `dedup`: it also
catches one image saved twice under two names or formats (PNG and lossless TIFF).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.datasets import image_list_sha1, loader_workers
from ..files import write_atomic, write_text_atomic

SHARD_SIZE = 4096
INDEX_COLUMNS = ["row", "sample", "path", "label", "sha1"]


@dataclass
class Embeddings:
    """Embeddings of a dataset: vectors float32 (N, D) unit norm; per row its sample index, path, label, sha1."""

    vectors: np.ndarray
    samples: List[int]
    paths: List[str]
    labels: List[int]
    hashes: List[str]
    params: Dict[str, Any] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def classes(self) -> List[str]:
        return list(self.params.get("classes") or [])


class HashedImages(torch.utils.data.Dataset):
    """(sample index, transformed image or None, sha1 of the decoded uint8 pixels or "") of ``indices``."""

    def __init__(self, dataset, transform, indices: Sequence[int]):
        self.dataset, self.transform, self.indices = dataset, transform, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        image = self.dataset.load_image(index)
        if image is None:
            return index, None, ""
        digest = hashlib.sha1(str(tuple(image.shape)).encode() + image.contiguous().numpy().tobytes()).hexdigest()
        return index, self.transform(image), digest


def collate_hashed(batch):
    """-> (indices of decoded samples, images (B, 3, H, W) or None, their sha1s, indices that failed)."""
    kept = [b for b in batch if b[1] is not None]
    failed = [b[0] for b in batch if b[1] is None]
    images = torch.stack([b[1] for b in kept]) if kept else None
    return [b[0] for b in kept], images, [b[2] for b in kept], failed


def open_dataset(data: str, kind: str = "auto", split: str = ""):
    """The images (or volume slices) of ``data`` as `data.loaders.build_image_dataset` reads them; labels kept."""
    from ..data.loaders import build_image_dataset

    # absolute paths: manifests written from these samples must not depend on the folder curate ran in
    return build_image_dataset(str(Path(data).expanduser().resolve()), kind, split or "", labelled=True)


def embedding_transform(info: Dict[str, Any], crop_size: int = 0):
    """The evaluation transform (resize, centre crop, normalise) the backbone expects."""
    from ..eval.features import EvalTransform, resolve_sizes

    cfg = SimpleNamespace(crop_size=int(crop_size), resize_size=0, mean=[], std=[])
    resize, crop, mean, std = resolve_sizes(cfg, info)
    return EvalTransform(resize, crop, mean, std)


def shard_paths(out_dir: Path, shard: int) -> Dict[str, Path]:
    folder = Path(out_dir) / "shards"
    return {name: folder / f"{name}_{shard:05d}.{ext}" for name, ext in
            (("emb", "npy"), ("rows", "csv"), ("done", "json"))}


def save_npy(path: Path, array: np.ndarray) -> Path:
    """``np.save`` through `write_atomic` (np.save on a path would append .npy to the temporary name)."""
    def write(tmp: Path) -> None:
        buffer = io.BytesIO()
        np.save(buffer, array)
        tmp.write_bytes(buffer.getvalue())

    return write_atomic(path, write)


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def read_csv_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def embed_params(data: str, kind: str, split: str, dataset, info: Dict[str, Any], transform,
                 shard_size: int) -> Dict[str, Any]:
    """Everything the embeddings depend on (JSON-able); a resume into the same folder must match it."""
    backbone = {k: info.get(k) for k in ("spec", "weights_sha1", "embed_dim", "patch_size", "module_class")}
    n = len(dataset)
    return dict(version=1, data=str(Path(data).expanduser().resolve()), kind=kind, split=split or "", n_images=n,
                images_sha1=image_list_sha1(dataset.samples), classes=list(dataset.classes), backbone=backbone,
                transform=transform.describe(), shard_size=int(shard_size), n_shards=max(1, -(-n // shard_size)),
                dtype="float16")


def check_or_write_params(out_dir: Path, params: Dict[str, Any]) -> None:
    """Write ``params.json``, or check that the folder's existing one is the same (else resuming would mix sets)."""
    path = Path(out_dir) / "params.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(params) if old.get(k) != params.get(k))
        if changed:
            raise ValueError(f"{out_dir} holds embeddings made with other settings ({', '.join(changed)} differ): "
                             f"use another --out folder, or delete this one")
        return
    write_text_atomic(path, json.dumps(params, indent=1) + "\n")


@torch.no_grad()
def embed_batch(model, images: torch.Tensor, device, precision: str) -> np.ndarray:
    """(B, 3, H, W) -> float16 (B, D): the final-norm CLS token, L2-normalised in float32 before the cast."""
    from ..eval.features import autocast_context, backbone_outputs

    with autocast_context(device, precision):
        cls, _ = backbone_outputs(model, images.to(device), 1)
    return torch.nn.functional.normalize(cls[:, -1].float(), dim=1).cpu().numpy().astype(np.float16)


def embed_shard(model, dataset, transform, out_dir: Path, shard: int, shard_size: int, *, batch_size: int,
                num_workers: int, device, precision: str, bar=None) -> Dict[str, Any]:
    """Embed samples [shard * shard_size, ...) and write the shard's three files (``done`` last)."""
    indices = range(shard * shard_size, min(len(dataset), (shard + 1) * shard_size))
    loader = torch.utils.data.DataLoader(HashedImages(dataset, transform, indices), batch_size=batch_size,
                                         num_workers=loader_workers(num_workers, len(indices), batch_size),
                                         collate_fn=collate_hashed)
    parts, rows, failed = [], [], []
    for kept, images, hashes, bad in loader:
        failed += bad
        if kept:
            parts.append(embed_batch(model, images, device, precision))
            rows += [(i, dataset.samples[i][0], dataset.samples[i][1], h) for i, h in zip(kept, hashes)]
        if bar is not None:
            bar.update(len(kept) + len(bad))
    dim = int(parts[0].shape[1]) if parts else 0
    files = shard_paths(out_dir, shard)
    save_npy(files["emb"], np.concatenate(parts) if parts else np.zeros((0, dim), np.float16))
    write_csv_atomic(files["rows"], ["sample", "path", "label", "sha1"], rows)
    done = dict(shard=shard, n_embedded=len(rows), skipped=[dataset.samples[i][0] for i in sorted(failed)])
    write_text_atomic(files["done"], json.dumps(done, indent=1) + "\n")
    return done


def pending_shards(out_dir: Path, n_shards: int, rank: int = 0, world: int = 1) -> List[int]:
    """This rank's shards (s % world == rank) that have no ``done`` file yet."""
    return [s for s in range(rank, n_shards, world) if not shard_paths(out_dir, s)["done"].is_file()]


def finish_index(out_dir: Path, n_shards: int) -> Optional[Path]:
    """Write ``index.csv`` and ``skipped.txt`` once every shard is done (None while some are missing)."""
    out_dir = Path(out_dir)
    if pending_shards(out_dir, n_shards):
        return None
    rows, skipped = [], []
    for s in range(n_shards):
        files = shard_paths(out_dir, s)
        skipped += json.loads(files["done"].read_text(encoding="utf-8"))["skipped"]
        rows += [(r["sample"], r["path"], r["label"], r["sha1"]) for r in read_csv_rows(files["rows"])]
    write_text_atomic(out_dir / "skipped.txt", "".join(f"{p}\n" for p in skipped))
    return write_csv_atomic(out_dir / "index.csv", INDEX_COLUMNS, [(i, *row) for i, row in enumerate(rows)])


def embed_dataset(data: str, out_dir, backbone: str = "random:vit_small/14", *, kind: str = "auto", split: str = "",
                  model=None, info: Optional[Dict[str, Any]] = None, crop_size: int = 0, batch_size: int = 64,
                  shard_size: int = SHARD_SIZE, num_workers: int = 0, device: str = "auto", precision: str = "auto",
                  rank: Optional[int] = None, world_size: Optional[int] = None, progress: bool = True,
                  log=print) -> Dict[str, Any]:
    """Embed every image of ``data`` into ``out_dir`` (see the module docstring); returns a summary dict.

    ``model``/``info`` pass a backbone object instead of a SPEC. ``rank``/``world_size`` default to the launch
    environment (torchrun, srun), else 0 / 1. Only ``out_dir`` is written.
    """
    from ..distributed.env import detect_env
    from ..eval.backbone_spec import describe_module, environment_device, load_backbone

    env = detect_env()
    rank = env.rank if rank is None else int(rank)
    world_size = env.world_size if world_size is None else int(world_size)
    out_dir = Path(out_dir)
    device = environment_device(device)
    if device == "cuda" and env.local_world_size > 1:
        device = f"cuda:{env.local_rank}"  # one GPU per rank of a node, as torchrun lays them out
    if model is None:
        model, info = load_backbone(backbone, device=device)
    info = info or describe_module(model)
    model = model.to(device).eval()
    dataset = open_dataset(data, kind, split)
    transform = embedding_transform(info, crop_size)
    params = embed_params(data, kind, split, dataset, info, transform, shard_size)
    check_or_write_params(out_dir, params)
    todo = pending_shards(out_dir, params["n_shards"], rank, world_size)
    n_todo = sum(len(range(s * shard_size, min(len(dataset), (s + 1) * shard_size))) for s in todo)
    log(f"[embed] {len(dataset)} images of {data} -> {out_dir}: {params['n_shards']} shard(s), rank {rank}/"
        f"{world_size} has {len(todo)} to do ({n_todo} images)")
    bar = None
    if progress and n_todo:
        from tqdm import tqdm

        bar = tqdm(total=n_todo, desc=f"embed rank {rank}", unit="img")
    skipped = []
    try:
        for shard in todo:
            done = embed_shard(model, dataset, transform, out_dir, shard, shard_size, batch_size=batch_size,
                               num_workers=num_workers, device=device, precision=precision, bar=bar)
            skipped += done["skipped"]
    finally:
        if bar is not None:
            bar.close()
    if skipped:
        log(f"[embed] {len(skipped)} unreadable file(s) skipped: {', '.join(skipped[:5])}"
            f"{' ...' if len(skipped) > 5 else ''} (all in {out_dir / 'skipped.txt'})")
    index = finish_index(out_dir, params["n_shards"])
    if index is not None:  # every rank's skips, this run's and earlier runs'
        skipped = (out_dir / "skipped.txt").read_text(encoding="utf-8").splitlines()
    return dict(out_dir=str(out_dir), n_images=len(dataset), n_shards=params["n_shards"], shards_done=todo,
                skipped=skipped, complete=index is not None)


def complete_params(out_dir) -> Dict[str, Any]:
    """``params.json`` of a complete ``embed`` folder (writing ``index.csv`` if the last rank did not); an error
    naming the missing shards if it is unfinished."""
    out_dir = Path(out_dir)
    params_path = out_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{out_dir} is not an embedding folder (no params.json): run `curate embed` first")
    params = json.loads(params_path.read_text(encoding="utf-8"))
    missing = pending_shards(out_dir, params["n_shards"])
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} shard(s) not embedded yet (e.g. {missing[:5]}): run "
                           f"`curate embed` again to finish")
    if not (out_dir / "index.csv").is_file():
        finish_index(out_dir, params["n_shards"])
    return params


def load_embeddings(out_dir, vectors: bool = True) -> Embeddings:
    """The complete embeddings of an ``embed`` folder; an error naming the missing shards if it is unfinished.
    ``vectors=False`` reads the index alone (``vectors`` is then (N, 0)): a rank of `curate cluster` then reads
    only its own rows with `embedding_rows`."""
    out_dir = Path(out_dir)
    params = complete_params(out_dir)
    rows = read_csv_rows(out_dir / "index.csv")
    skipped = (out_dir / "skipped.txt").read_text(encoding="utf-8").splitlines()
    matrix = embedding_rows(out_dir, np.arange(len(rows)), params) if vectors else np.zeros((len(rows), 0), np.float32)
    return Embeddings(matrix, [int(r["sample"]) for r in rows], [r["path"] for r in rows],
                      [int(r["label"]) for r in rows], [r["sha1"] for r in rows], params, skipped)


def embedding_rows(out_dir, rows: np.ndarray, params: Optional[Dict[str, Any]] = None) -> np.ndarray:
    """float32 (len(rows), D): the embeddings of ``rows`` (sorted row numbers of ``index.csv``) of a complete
    ``embed`` folder (``params``: its `complete_params`, when the caller has them). Only the shards those rows fall
    in are read, memory-mapped, so that each rank of a multi-rank step holds its own rows alone."""
    out_dir = Path(out_dir)
    params = params if params is not None else complete_params(out_dir)
    shards = [np.load(shard_paths(out_dir, s)["emb"], mmap_mode="r") for s in range(params["n_shards"])]
    starts = np.cumsum([0] + [len(v) for v in shards])  # row of each shard's first embedding
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows[0] < 0 or rows[-1] >= starts[-1] or np.any(np.diff(rows) <= 0)):
        raise ValueError(f"{out_dir}: rows must be increasing and in [0, {starts[-1]})")
    dim = max([v.shape[1] for v in shards if len(v)], default=0)
    parts = [np.zeros((0, dim), np.float32)]
    for s, shard in enumerate(shards):
        low, high = np.searchsorted(rows, [starts[s], starts[s + 1]])
        if high > low:
            parts.append(np.asarray(shard[rows[low:high] - starts[s]], dtype=np.float32))
    return np.concatenate(parts)
