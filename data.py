"""The training images, as training and evaluation load them: an ImageFolder (or torchvision's
CIFAR10) decoded through the serving decoder (cifar10_serve.images) by the model's spec, cached
between runs, and the fixed train/validation split.
"""
import hashlib
import inspect
from pathlib import Path

import torch
import torchvision
from tqdm import tqdm

from cifar10_serve import images as decoder
from cifar10_serve.images import decode_image, image_tensor
from cifar10_serve.spec import CIFAR10


def load_image_folder(root, limit=0, cache_dir=None, spec=CIFAR10):
    """An ImageFolder's images through the serving decoder, as ``spec``'s model takes them: uint8
    (N, C, H, W), labels, classes, file paths. With ``limit``, a fixed random subset of that many
    images. With ``cache_dir``, the decoded images are kept there between runs (50,000 JPEGs take
    ~20 s to 2 min to decode), under a key of the files' names, sizes and times, the decoder's own
    source and the spec's input (size, channels, resize policy)."""
    folder = torchvision.datasets.ImageFolder(str(root), loader=lambda path: path)
    samples = folder.samples
    if limit:
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0))
        samples = [samples[i] for i in order[:limit].tolist()]
    cached = Path(cache_dir) / f"{_cache_key(root, samples, spec)}.pt" if cache_dir else None
    if cached is not None and cached.exists():
        images = torch.load(cached, weights_only=True)
    else:
        images = torch.stack([image_tensor(decode_image(Path(p).read_bytes(), spec))
                              for p, _ in tqdm(samples, desc="decode", leave=False)])
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save(images, cached.with_suffix(".tmp"))
            cached.with_suffix(".tmp").replace(cached)
    labels = torch.tensor([label for _, label in samples])
    return images, labels, list(folder.classes), [p for p, _ in samples]


def _cache_key(root, samples, spec):
    """What the decoded images depend on: each file (name, size, time, label, in order), the
    decoding code (cifar10_serve/images.py alone: a change elsewhere keeps the cache) and what the
    spec says of the input."""
    digest = hashlib.sha256(inspect.getsource(decoder).encode())
    digest.update(repr((spec.image_size, spec.channels, spec.resize, spec.resize_to)).encode())
    for path, label in samples:
        stat = Path(path).stat()
        digest.update(f"{Path(path).relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}|"
                      f"{label}\n".encode())
    return digest.hexdigest()[:24]


def load_images(args, spec=CIFAR10):
    """All images as one uint8 tensor (N, C, H, W) as ``spec``'s model takes them, their labels,
    the class names, the source (torchvision's CIFAR10: 32x32 RGB as it comes)."""
    if args.data_dir is not None:
        images, labels, classes, _ = load_image_folder(args.data_dir, args.limit,
                                                       args.cache_dir and Path(args.cache_dir),
                                                       spec)
        return images, labels, classes, f"ImageFolder {args.data_dir}"
    data = torchvision.datasets.CIFAR10(str(args.download_root), train=True, download=True)
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(data.targets)
    if args.limit:
        images, labels = images[:args.limit], labels[:args.limit]
    return images, labels, list(data.classes), "torchvision.datasets.CIFAR10 (train split)"


def split_indices(n, val_size):
    """A fixed train/validation split of n images: the same ones are held out whatever --seed is."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
    return order[val_size:], order[:val_size]


def split(images, labels, val_size):
    train, val = split_indices(len(images), val_size)
    return images[train], labels[train], images[val], labels[val]
