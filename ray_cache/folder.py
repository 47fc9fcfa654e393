"""Image-folder training through the cache: a PyTorch map-style dataset over a prefix.

:class:`ImageFolder` is torchvision's ``ImageFolder`` for object stores: the class folders
directly under ``root`` are the labels (sorted, so ``class_to_idx`` is the same in every
process), every file below a class folder with an image extension is a sample. It lists
the prefix once (:func:`ray_cache.snapshot`), so an epoch sends no store request per file:
the first epoch reads each file with one GET and fills the cache, later epochs read from
this node's memory and disk (a forked ``DataLoader`` worker maps the cache's disk files
directly). It needs neither torch nor torchvision to build; ``DataLoader`` takes it as it is.

Examples
--------
>>> import ray_cache, torch  # doctest: +SKIP
>>> ds = ray_cache.ImageFolder("s3://bucket/imagenet/train/", transform=my_transform)  # doctest: +SKIP
>>> ds.classes[:2], len(ds)  # doctest: +SKIP
(['n01440764', 'n01443537'], 1281167)
>>> loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=8, shuffle=True)  # doctest: +SKIP
"""

from __future__ import annotations

import io
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ray_cache.files.snapshot import SnapshotFileSystem, snapshot

#: torchvision's ``IMG_EXTENSIONS``.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def pil_loader(data: bytes) -> Any:
    """An image file's bytes decoded as a PIL image in RGB (torchvision's default loader)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class ImageFolder:
    """Samples ``(image, class index)`` from class folders under ``root``, read through the cache.

    Parameters
    ----------
    root : str
        The prefix holding one folder per class: ``"s3://bucket/train/"``, ``"gs://..."``,
        ``"abfs://..."`` or a local directory.
    transform, target_transform : callable, optional
        Applied to each image and each class index, as torchvision does.
    loader : callable, optional
        Turns a file's bytes into a sample (default :func:`pil_loader`, which needs Pillow).
        ``loader=bytes`` gives the raw bytes.
    extensions : tuple of str
        File suffixes that are samples (case-insensitive), default :data:`IMG_EXTENSIONS`.
    filesystem, storage_options, refresh_every
        As for :func:`ray_cache.snapshot`. A :class:`ray_cache.SnapshotFileSystem` may be
        given as ``filesystem`` to share its listing.

    Attributes
    ----------
    classes : list of str
        Class folder names, sorted.
    class_to_idx : dict
        Class name to index.
    samples : list of (str, int)
        Each sample's path and class index, sorted by class, then path.
    fs : SnapshotFileSystem
        The snapshot the samples are read through (``fs.refresh()`` to see new files;
        rebuild the dataset to include them as samples).

    Raises
    ------
    FileNotFoundError
        If ``root`` has no objects, or no class folder holds a sample.
    """

    def __init__(self, root: str, transform: Optional[Callable[[Any], Any]] = None,
                 target_transform: Optional[Callable[[int], Any]] = None,
                 loader: Optional[Callable[[bytes], Any]] = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, filesystem: Any = None,
                 storage_options: Optional[Dict[str, Any]] = None,
                 refresh_every: Optional[float] = None) -> None:
        if isinstance(extensions, str) or not all(isinstance(e, str) for e in extensions):
            raise ValueError(f"extensions must be a sequence of suffixes like '.jpg', got {extensions!r}")
        if isinstance(filesystem, SnapshotFileSystem):
            if storage_options or refresh_every is not None:
                raise ValueError("a SnapshotFileSystem as filesystem= takes no storage_options= "
                                 "or refresh_every=")
            self.fs = filesystem
            self.root = filesystem._strip_protocol(root).rstrip("/")
        else:
            self.fs = snapshot(root, filesystem=filesystem, storage_options=storage_options,
                               refresh_every=refresh_every)
            self.root = self.fs.prefix
        self.transform, self.target_transform = transform, target_transform
        self.loader = loader or pil_loader
        self.extensions = tuple(e.lower() for e in extensions)
        self.classes, self.class_to_idx, self.samples = self._find_samples()
        self.targets = [t for _p, t in self.samples]

    def _find_samples(self) -> Tuple[List[str], Dict[str, int], List[Tuple[str, int]]]:
        entries = self.fs.ls(self.root, detail=True)
        classes = sorted(e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        if not classes:
            raise FileNotFoundError(2, "No class folders (one folder per class) in", self.root)
        class_to_idx = {c: i for i, c in enumerate(classes)}
        samples = []
        for c in classes:
            for path in self.fs.find(f"{self.root}/{c}"):
                if path.lower().endswith(self.extensions):
                    samples.append((path, class_to_idx[c]))
        if not samples:
            raise FileNotFoundError(2, f"No files ending in {', '.join(self.extensions)} under", self.root)
        return classes, class_to_idx, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, Any]:
        path, target = self.samples[index]
        sample = self.loader(self.fs.cat_file(path))  # a rewritten file is read at its new version
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __repr__(self) -> str:
        return (f"ImageFolder({self.fs.target_protocol}://{self.root}, {len(self.classes)} classes, "
                f"{len(self):,} samples)")
