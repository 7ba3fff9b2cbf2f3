"""Classify one episode of the user's own images: folders in, per-image predictions CSV out."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from metalearn.data.files.preprocess import image_array
from metalearn.data.tasks import Split
from metalearn.errors import DataError
from metalearn.run import Run

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _load(paths: list[Path], preprocess: dict, device: torch.device) -> torch.Tensor:
    """Images -> (B, channels, H, W) floats in [0, 1], exactly as the training cache was made."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(image_array(image, **preprocess))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(
                f"cannot read image {path} ({error}); remove it or convert it"
            ) from error
    x = torch.from_numpy(np.stack(arrays)).to(device)
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (B, channels, H, W)
    return x.float() / 255.0


def read_episode(support_dir: Path, query_dir: Path, preprocess: dict, device: torch.device):
    """Support: one subfolder per class. Query: images, in class-named subfolders or loose."""
    for folder in (support_dir, query_dir):
        if not folder.is_dir():
            raise DataError(f"episode folder {folder} does not exist")
    classes = sorted(p.name for p in support_dir.iterdir() if p.is_dir() and _images(p))
    if len(classes) < 2:
        raise DataError(
            f"{support_dir} must hold one subfolder of images per class (at least 2 classes); "
            f"found {len(classes)}"
        )
    support_paths, support_y = [], []
    for label, name in enumerate(classes):
        paths = _images(support_dir / name)
        support_paths += paths
        support_y += [label] * len(paths)
    query_paths, query_true = _images(query_dir), [None] * len(_images(query_dir))
    for sub in sorted(p for p in query_dir.iterdir() if p.is_dir()):
        paths = _images(sub)
        query_paths += paths
        query_true += [sub.name] * len(paths)
    if not query_paths:
        raise DataError(f"{query_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    unknown = sorted({t for t in query_true if t is not None} - set(classes))
    if unknown:
        raise DataError(f"query subfolders {unknown} name no support class ({classes})")
    support = Split(
        _load(support_paths, preprocess, device), torch.tensor(support_y, device=device)
    )
    return classes, support, query_paths, _load(query_paths, preprocess, device), query_true


def classify_episode(run: Run, support_dir: Path, query_dir: Path, output: Path) -> dict:
    """Adapt to the support folders, predict every query image, write a CSV; return a summary."""
    if run.preprocess is None:
        raise DataError(
            f"data={run.config.data.name} has no images: episode folders apply to "
            f"image data sets only"
        )
    classes, support, paths, query_x, truth = read_episode(
        Path(support_dir), Path(query_dir), run.preprocess, run.device
    )
    if run.algo.needs_head and len(classes) != run.train_shape[0]:
        raise DataError(
            f"this {run.config.algo.name} checkpoint has a {run.train_shape[0]}-way head but the "
            f"support folder has {len(classes)} classes; give exactly {run.train_shape[0]}"
        )
    with run.autocast():
        logits = run.algo.predict(support, query_x).float()
    probabilities = logits.softmax(-1).cpu()
    predicted = probabilities.argmax(-1).tolist()
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "predicted", "probability", "true"])
        for path, p, row, t in zip(paths, predicted, probabilities, truth, strict=True):
            writer.writerow([str(path), classes[p], f"{row[p].item():.4f}", t or ""])
    labelled = [(classes[p], t) for p, t in zip(predicted, truth, strict=True) if t is not None]
    accuracy = sum(p == t for p, t in labelled) / len(labelled) if labelled else None
    return {
        "classes": classes,
        "support_images": len(support.y),
        "query_images": len(paths),
        "labelled_query_images": len(labelled),
        "accuracy": accuracy,
        "predictions": str(output),
    }
