"""The training images for a GPU machine with no network, in parts that each fit one transfer.

A device call carries the working tree and what `carry` names, 64 MiB in all; the repository and
the offline pack (bench/pack_offline.sh) take most of one. The 50,000 CIFAR-10 training JPEGs
share their JPEG tables, so one xz-compressed tar of them is ~16 MB: split into parts of at most
``--part-mb`` (default 16 MB) they travel beside the repository in one call, or in later calls
(a warm machine keeps ignored files between two calls sent close together).

    python bench/data_pack.py pack ../shared/data/cifar10/train .data/pack      # here
    python bench/data_pack.py unpack .data/pack .data/train                     # there
    make gpu-check DATA_DIR=.data/train ...

``pack`` writes the parts and MANIFEST.json: each part's SHA-256, the number of files per class
and one digest of every file's path and bytes. ``unpack`` checks the parts' digests before it
extracts anything, then counts the files per class and recomputes the content digest, and exits
non-zero naming what differs: a missing, truncated or stale part never trains a model.
"""
import argparse
import hashlib
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

MANIFEST = "MANIFEST.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_files(root):
    """The images of an ImageFolder (class/file), sorted: the order every digest uses."""
    return sorted(p for p in Path(root).rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def content_digest(root, files):
    """SHA-256 over every file's relative path and bytes, in order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def per_class(root, files):
    counts = {}
    for path in files:
        name = path.relative_to(root).parts[0]
        counts[name] = counts.get(name, 0) + 1
    return counts


def pack(source, out, part_mb):
    source, out = Path(source), Path(out)
    files = image_files(source)
    if not files:
        raise SystemExit(f"no images under {source}")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tarfile.TarInfo(path.relative_to(source).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as f:
                tar.addfile(info, f)
    blob = lzma.compress(buffer.getvalue(), preset=6)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    size = int(part_mb * 1e6)
    parts = []
    for index, start in enumerate(range(0, len(blob), size)):
        chunk = blob[start:start + size]
        name = f"part-{index:02d}"
        (out / name).write_bytes(chunk)
        parts.append({"name": name, "bytes": len(chunk),
                      "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"files": len(files), "per_class": per_class(source, files),
                "content_sha256": content_digest(source, files), "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{len(files):,} images, {len(blob) / 1e6:.1f} MB in {len(parts)} part(s) of at most "
          f"{part_mb:g} MB -> {out}")
    return manifest


def unpack(folder, dest):
    folder, dest = Path(folder), Path(dest)
    manifest = json.loads((folder / MANIFEST).read_text())
    chunks = []
    for part in manifest["parts"]:
        path = folder / part["name"]
        if not path.exists():
            raise SystemExit(f"{path} is missing ({len(manifest['parts'])} parts expected)")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise SystemExit(f"{path}: SHA-256 differs from {MANIFEST} ({len(chunk):,} bytes, "
                             f"{part['bytes']:,} expected): carry it again")
        chunks.append(chunk)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(b"".join(chunks)))) as tar:
        tar.extractall(dest, filter="data")
    files = image_files(dest)
    found = {"files": len(files), "per_class": per_class(dest, files),
             "content_sha256": content_digest(dest, files)}
    wrong = [key for key, value in found.items() if value != manifest[key]]
    if wrong:
        raise SystemExit(f"{dest}: {', '.join(wrong)} differ from {MANIFEST}: "
                         + "; ".join(f"{k} {found[k]} != {manifest[k]}" for k in wrong
                                     if k != "content_sha256"))
    print(f"{len(files):,} images in {dest}, {len(found['per_class'])} classes, "
          f"content digest {found['content_sha256'][:16]}... as packed")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    p = verbs.add_parser("pack", help="an ImageFolder -> parts and MANIFEST.json")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--part-mb", type=float, default=16, help="largest part, MB (default: 16)")
    u = verbs.add_parser("unpack", help="parts -> an ImageFolder, every digest checked")
    u.add_argument("folder", type=Path)
    u.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    if args.verb == "pack":
        pack(args.source, args.out, args.part_mb)
    else:
        unpack(args.folder, args.dest)


if __name__ == "__main__":
    sys.exit(main())
