"""Image-folder training through the cache: ``ray_cache.ImageFolder`` and Ray Data's file readers.

Images are real PNG files in class folders on the S3 server; what the dataset returns is
compared with the same files read straight from the server and decoded with Pillow, and
with Ray Data's own readers on s3fs. Requests are counted at the proxy.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import ray
import torch
from PIL import Image

import ray_cache
from conftest import data_gets
from ray_cache.files import pages


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture()
def folder(s3fs_direct, prefix, tmp_path):
    """18 images in 3 class folders (one nested deeper), a README and a non-image; the same
    tree on local disk, for torchvision's rule to be applied to."""
    root = f"{prefix}/train"
    tree = {}
    for i in range(18):
        cls = ["cat", "dog", "emu"][i % 3]
        sub = "/more" if i % 5 == 0 else ""
        tree[f"{cls}{sub}/{i:03d}.{'PNG' if i == 7 else 'png'}"] = png(i)
    tree["dog/notes.txt"] = b"not an image"
    tree["README.md"] = b"top-level file, not a class"
    for rel, data in tree.items():
        s3fs_direct.pipe_file(f"{root}/{rel}", data)
        local = tmp_path / "local" / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
    return root, str(tmp_path / "local")


def torchvision_samples(local_root: str):
    """torchvision's ``find_classes`` and ``make_dataset`` on a local directory (its rule:
    sorted class folders; under each, files walked in sorted order with image suffixes)."""
    classes = sorted(e.name for e in os.scandir(local_root) if e.is_dir())
    samples = []
    for idx, cls in enumerate(classes):
        for dirpath, _dirs, names in sorted(os.walk(os.path.join(local_root, cls), followlinks=True)):
            for name in sorted(names):
                if name.lower().endswith(ray_cache.folder.IMG_EXTENSIONS):
                    samples.append((os.path.relpath(os.path.join(dirpath, name), local_root), idx))
    return classes, samples


def test_classes_samples_and_images_match_torchvision_and_the_files(cache, folder, s3fs_proxied,
                                                                    s3fs_direct, proxy):
    root, local_root = folder
    proxy.reset()
    ds = ray_cache.ImageFolder(f"s3://{root}/", filesystem=s3fs_proxied)
    assert [r["method"] for r in proxy.requests()] == ["GET", "HEAD"], (
        "one LIST builds the dataset (and one HEAD proves the right to read)")
    classes, samples = torchvision_samples(local_root)
    assert ds.classes == classes == ["cat", "dog", "emu"]
    assert ds.class_to_idx == {c: i for i, c in enumerate(classes)}
    assert [(p[len(root) + 1:], t) for p, t in ds.samples] == samples
    assert ds.targets == [t for _p, t in samples] and len(ds) == 18
    for i in (0, 7, 17):
        image, target = ds[i]
        expected = Image.open(io.BytesIO(s3fs_direct.cat_file(ds.samples[i][0]))).convert("RGB")
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(expected))
        assert target == samples[i][1]
    raw = ray_cache.ImageFolder(root, filesystem=s3fs_proxied, loader=bytes,
                                transform=len, target_transform=str)
    assert raw[3] == (len(s3fs_direct.cat_file(raw.samples[3][0])), str(raw.samples[3][1]))


def test_a_forked_dataloader_reads_each_file_once_cold_and_never_warm(cache, folder, s3fs_proxied, proxy):
    root, _local = folder
    ds = ray_cache.ImageFolder(root, filesystem=s3fs_proxied, loader=bytes)
    files = {p: t for p, t in ds.samples}

    def epoch():
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True,
                                             collate_fn=list, timeout=120)  # fork, the default
        seen = [(data, target) for batch in loader for data, target in batch]
        assert sorted(t for _d, t in seen) == sorted(files.values()), "every sample once"
        return seen

    proxy.reset()
    cold = epoch()
    gets = data_gets(proxy)
    assert len(gets) == len(files), "one GET per file"
    assert all(r["if_match"] for r in gets) and [r for r in proxy.requests() if r["method"] == "HEAD"] == []
    for _ in range(2):
        proxy.reset()
        pages.reader().clear()
        warm = epoch()
        assert proxy.requests() == [], "a warm epoch sends no request at all"
        assert sorted(warm) == sorted(cold)


def test_spawned_dataloader_workers_read_the_snapshot_without_listing(cache, folder, s3fs_proxied, proxy):
    root, _local = folder
    ds = ray_cache.ImageFolder(root, filesystem=s3fs_proxied, loader=bytes)
    expected = sorted(ds[i] for i in range(len(ds)))  # fills the cache
    proxy.reset()
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=2, collate_fn=list, timeout=120,
                                         multiprocessing_context="spawn")
    got = sorted(item for batch in loader for item in batch)
    assert got == expected
    assert proxy.requests() == [], "spawned workers got the listing with the dataset and read warm"


def test_ray_data_file_readers_through_a_snapshot(cache, folder, s3fs_proxied, s3fs_direct, proxy):
    root, _local = folder
    snap = ray_cache.snapshot(root, filesystem=s3fs_proxied)
    expected = ray.data.read_binary_files(root, filesystem=s3fs_direct, include_paths=True).take_all()
    proxy.reset()
    got = ray.data.read_binary_files(root, filesystem=snap, include_paths=True).take_all()
    key = lambda r: r["path"]  # noqa: E731
    assert sorted(got, key=key) == sorted(expected, key=key)
    assert len(data_gets(proxy)) == len(expected)
    proxy.reset()
    images = ray.data.read_images(f"{root}/cat", filesystem=snap, include_paths=True).take_all()
    anchor = ray.data.read_images(f"{root}/cat", filesystem=s3fs_direct, include_paths=True).take_all()
    assert len(images) == len(anchor) == 6
    for a, b in zip(sorted(images, key=key), sorted(anchor, key=key)):
        assert a["path"] == b["path"] and np.array_equal(a["image"], b["image"])
    assert data_gets(proxy) == [], "files read once are warm for every reader"


def test_bad_input(cache, folder, s3fs_proxied, prefix, s3fs_direct):
    root, _local = folder
    with pytest.raises(ValueError, match="extensions"):
        ray_cache.ImageFolder(root, filesystem=s3fs_proxied, extensions=".png")
    s3fs_direct.pipe_file(f"{prefix}/flat/a.png", png(1))
    with pytest.raises(FileNotFoundError, match="class folders"):
        ray_cache.ImageFolder(f"{prefix}/flat", filesystem=s3fs_proxied)
    with pytest.raises(FileNotFoundError, match="nothing"):
        ray_cache.ImageFolder(f"{prefix}/nothing", filesystem=s3fs_proxied)
    with pytest.raises(FileNotFoundError, match=".jpg"):
        ray_cache.ImageFolder(root, filesystem=s3fs_proxied, extensions=(".jpg",))
