"""The 84x84 input pipeline: images per second from the cached tensor file to the device,
against torchvision's ImageFolder + DataLoader reading the same JPEGs, in the same run."""

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from metalearn.data.files.preprocess import image_array
from metalearn.data.files.root import load_cache, save_cache
from metalearn.data.tasks import EpisodeSampler
from metalearn.hardware import synchronize

CLASSES, PER_CLASS, SIZE = 20, 60, 84  # 1200 JPEGs: a slice of miniImageNet's layout


def write_image_folder(root: Path, seed: int = 0) -> Path:
    """CLASSES folders of PER_CLASS 84x84 JPEGs (smooth random images, ImageFolder layout)."""
    rng = np.random.default_rng(seed)
    folder = root / "images"
    for c in range(CLASSES):
        (folder / f"class{c:03d}").mkdir(parents=True)
        for e in range(PER_CLASS):
            small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BILINEAR)
            image.save(folder / f"class{c:03d}" / f"{e:04d}.jpg", quality=90)
    return folder


def decode_to_cache(folder: Path, cache: Path) -> float:
    """Decode every class folder once into a uint8 (C, E, 3, H, W) cache; return the seconds."""
    started = time.perf_counter()
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    arrays = []
    for class_dir in classes:
        images = []
        for path in sorted(class_dir.iterdir()):
            with Image.open(path) as image:
                images.append(image_array(image, mode="RGB", invert=False, size=SIZE))
        arrays.append(np.stack(images))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 1, 4, 2, 3).contiguous()
    save_cache(cache, {"train": images})
    return time.perf_counter() - started


def _rate(load_batch, images_per_batch: int, min_seconds: float) -> dict[str, float]:
    load_batch()  # warm-up: page the cache in, start the workers
    started, batches = time.perf_counter(), 0
    while batches < 3 or time.perf_counter() - started < min_seconds:
        load_batch()
        batches += 1
    seconds = (time.perf_counter() - started) / batches
    return {"seconds_per_batch": seconds, "images_per_second": images_per_batch / seconds}


def pipeline_bench(
    device: torch.device, *, tasks: int, ways: int, per_class: int, workers: int, min_seconds: float
) -> dict[str, Any]:
    """Time both pipelines on batches of tasks * ways * per_class images."""
    images_per_batch = tasks * ways * per_class
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_image_folder(Path(tmp))
        cache = Path(tmp) / "cache.pt"
        decode_seconds = decode_to_cache(folder, cache)

        started = time.perf_counter()
        held = load_cache(cache, mmap=True)["train"]
        sampler = EpisodeSampler(held, device)
        open_seconds = time.perf_counter() - started
        generator = torch.Generator(device).manual_seed(0)

        def ours() -> None:
            batch = sampler.sample(generator, tasks, ways, 1, per_class - 1)
            synchronize(batch.query.x)

        import torchvision

        dataset = torchvision.datasets.ImageFolder(
            str(folder), transform=torchvision.transforms.ToTensor()
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=images_per_batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        stream = iter(_forever(loader))

        def baseline() -> None:
            x, _ = next(stream)
            synchronize(x.to(device, non_blocking=True))

        results = {
            "ours": _rate(ours, images_per_batch, min_seconds),
            "imagefolder_dataloader": _rate(baseline, images_per_batch, min_seconds),
        }
    results["ours"] |= {"decode_once_seconds": decode_seconds, "open_seconds": open_seconds}
    results["imagefolder_dataloader"]["workers"] = workers
    ratio = (
        results["ours"]["images_per_second"]
        / results["imagefolder_dataloader"]["images_per_second"]
    )
    return {
        "images": CLASSES * PER_CLASS,
        "image_size": SIZE,
        "images_per_batch": images_per_batch,
        "results": results,
        "speedup": ratio,
    }


def _forever(loader):
    while True:
        yield from loader


def markdown(pipeline: dict[str, Any]) -> str:
    ours, base = pipeline["results"]["ours"], pipeline["results"]["imagefolder_dataloader"]
    return "\n".join(
        [
            f"| 84x84 input pipeline, batches of {pipeline['images_per_batch']} images "
            f"| images / s | s / batch | speedup |",
            "| --- | --- | --- | --- |",
            f"| cached uint8 tensor (memory-mapped) -> device, metalearn's sampler "
            f"| {ours['images_per_second']:,.0f} | {ours['seconds_per_batch']:.4f} "
            f"| {pipeline['speedup']:.1f}x |",
            f"| torchvision ImageFolder + DataLoader ({base['workers']} workers, JPEG decode) "
            f"| {base['images_per_second']:,.0f} | {base['seconds_per_batch']:.4f} | 1.0x |",
            "",
            f"The cache is built once: {ours['decode_once_seconds']:.1f} s to decode "
            f"{pipeline['images']} JPEGs; opening it memory-mapped took "
            f"{ours['open_seconds'] * 1000:.0f} ms.",
        ]
    )
