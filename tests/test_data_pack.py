"""bench/data_pack.py: the training images for a GPU machine, packed in parts and checked there."""
import json
import shutil
from pathlib import Path

import pytest

from bench import data_pack

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def folder(tmp_path):
    """A small ImageFolder: the ten fixture images, two copies each under their class."""
    root = tmp_path / "train"
    for image in sorted(FIXTURES.glob("*.jpg")):
        (root / image.stem).mkdir(parents=True)
        for n in range(2):
            shutil.copy(image, root / image.stem / f"{n:04d}.jpg")
    return root


def test_round_trip_in_several_parts_keeps_every_file(folder, tmp_path):
    manifest = data_pack.pack(folder, tmp_path / "pack", part_mb=0.004)
    assert len(manifest["parts"]) > 1  # 20 small JPEGs over parts of 4 kB
    assert manifest["files"] == 20 and set(manifest["per_class"].values()) == {2}
    found = data_pack.unpack(tmp_path / "pack", tmp_path / "there")
    assert found["content_sha256"] == manifest["content_sha256"]
    for path in data_pack.image_files(folder):
        assert (tmp_path / "there" / path.relative_to(folder)).read_bytes() == path.read_bytes()


def test_a_changed_or_missing_part_stops_before_extracting(folder, tmp_path):
    manifest = data_pack.pack(folder, tmp_path / "pack", part_mb=0.004)
    part = tmp_path / "pack" / manifest["parts"][1]["name"]
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(SystemExit, match="SHA-256 differs"):
        data_pack.unpack(tmp_path / "pack", tmp_path / "there")
    assert not (tmp_path / "there").exists()
    part.unlink()
    with pytest.raises(SystemExit, match="is missing"):
        data_pack.unpack(tmp_path / "pack", tmp_path / "there")


def test_a_manifest_that_counts_other_files_is_refused(folder, tmp_path):
    data_pack.pack(folder, tmp_path / "pack", part_mb=1)
    manifest_path = tmp_path / "pack" / data_pack.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["per_class"]["cat"] = 3  # the parts are intact; what they hold is not what was meant
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="per_class"):
        data_pack.unpack(tmp_path / "pack", tmp_path / "there")
