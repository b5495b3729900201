"""train.py's output, and that training-eval, offline evaluation and the handler agree."""
import inspect
import json
import shutil

import pytest
import torch
from conftest import FIXTURES, ROOT, handle

import data
import evaluate
import train
from cifar10_serve.images import eval_transform
from cifar10_serve.net import Cifar10Net
from cifar10_serve.spec import CIFAR10, CIFAR10_CLASSES, from_checkpoint
from cifar10_serve.runtimes import INT8_FILE


def fixture_folder(root):
    """The shipped real CIFAR-10 fixtures as an ImageFolder (one image per class)."""
    for name in CIFAR10_CLASSES:
        (root / name).mkdir(parents=True)
        shutil.copy(FIXTURES / f"{name}.jpg", root / name / "0.jpg")
    return root


def test_train_writes_a_loadable_checkpoint_with_its_metadata(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)  # plain data, no pickled code
    spec = from_checkpoint(checkpoint)
    assert checkpoint["spec"] == spec.to_dict()  # the spec, whole, as plain data
    assert spec == CIFAR10.replace(arch_args={"widths": [8, 16, 16]})
    assert spec.classes == CIFAR10_CLASSES and spec.mean == (0.4914, 0.4822, 0.4465)
    assert not {"model_args", "normalization"} & set(checkpoint)  # one source: the spec
    assert set(checkpoint["per_class_val_accuracy"]) == set(CIFAR10_CLASSES)
    assert 0 <= checkpoint["val_accuracy"] <= 1 and checkpoint["val_size"] == 20
    assert len(checkpoint["history"]) == 1 and "train.py" in checkpoint["command"]
    assert {"torch", "torchvision", "python"} <= set(checkpoint["versions"])
    net = Cifar10Net(widths=[8, 16, 16], num_classes=10)
    net.load_state_dict(checkpoint["state_dict"])  # strict: every key matches
    for plot in (".curve.png", ".confusion.png"):
        assert tiny_checkpoint.with_suffix(plot).read_bytes()[:4] == b"\x89PNG"


def test_training_is_deterministic_under_a_seed(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.parent / "data"
    out = tmp_path / "again.pt"
    from conftest import TINY_ARGS
    train.train(train.parse_args(["--data-dir", str(data), "--out", str(out)] + TINY_ARGS))
    first = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    second = torch.load(out, weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_handler_tensor_equals_the_training_eval_tensor(make_handler, tiny_checkpoint, tmp_path):
    spec = from_checkpoint(torch.load(tiny_checkpoint, weights_only=True))
    images, _, _, paths = data.load_image_folder(fixture_folder(tmp_path / "folder"), spec=spec)
    training_view = eval_transform(spec)(images)
    handler = make_handler(tiny_checkpoint)
    rows, _ = handler.decode([{"body": open(p, "rb").read()} for p in paths])
    served_view = handler.to_batch([image for row in rows for image in row.images])
    assert torch.equal(served_view, training_view)


def served_and_offline(make_handler, checkpoint, folder):
    """(the served handler's top class per image of folder, offline evaluation's, the truth)."""
    (offline,), truth, _ = evaluate.predict_offline(folder, checkpoint)
    _, _, _, paths = data.load_image_folder(folder)
    handler = make_handler(checkpoint, runtime="onnx")  # the served forward
    answers, _ = handle(handler, [{"body": open(p, "rb").read()} for p in paths])
    return [next(iter(a)) for a in answers], offline, truth


def test_handler_predictions_equal_offline_evaluation(make_handler, tiny_checkpoint, tmp_path):
    served, offline, truth = served_and_offline(make_handler, tiny_checkpoint,
                                                fixture_folder(tmp_path / "folder"))
    assert served == offline
    assert truth == list(CIFAR10_CLASSES)


def test_shipped_weights_serve_as_evaluated_offline(make_handler, tmp_path):
    """The default weights in weights/ load in the handler and agree with offline evaluation."""
    shipped = ROOT / "weights" / "cifar10.pt"
    assert from_checkpoint(torch.load(shipped, weights_only=True)).classes == CIFAR10_CLASSES
    served, offline, _ = served_and_offline(make_handler, shipped,
                                            fixture_folder(tmp_path / "folder"))
    assert served == offline


@pytest.mark.parametrize("pad, cutout", [(0, 0), (2, 0), (4, 8)])
def test_augment_translates_flips_and_cuts_out_as_asked(pad, cutout):
    """Each image keeps its content moved by at most `pad` pixels; cutout zeroes one square of at
    most cutout x cutout pixels (fewer at a border) per image."""
    images = torch.arange(1.0, 1 + 8 * 3 * 16 * 16).view(8, 3, 16, 16)  # all nonzero, distinct
    generator = torch.Generator().manual_seed(0)
    no_flip = torch.zeros(8, dtype=torch.bool)
    out = train.augment(images, 0, no_flip, generator, pad, cutout)
    zeros = (out == 0).all(dim=1).sum(dim=(1, 2))
    if cutout:
        assert ((zeros > 0) & (zeros <= cutout * cutout)).all()
    else:
        assert (zeros == 0).all()
    for image, moved in zip(images, out):
        kept = moved[:, pad:16 - pad, pad:16 - pad]  # the centre, inside the reflected border
        found = any(torch.equal(kept[kept != 0], image[:, y:y + 16 - 2 * pad,
                                                       x:x + 16 - 2 * pad][kept != 0])
                    for y in range(2 * pad + 1) for x in range(2 * pad + 1))
        assert found
    flipped = train.augment(images, 1, no_flip, torch.Generator().manual_seed(0), 0, 0)
    assert torch.equal(flipped, images.flip(-1))  # odd epochs mirror the images that were not


def test_evaluate_reports_fp32_and_the_served_int8(colour_checkpoint, exports, make_handler,
                                                   tmp_path):
    """`make evaluate` on weights: fp32 and the int8 export the archive serves, side by side; the
    int8 answers equal the handler's (runtime int8) on the same images."""
    folder = fixture_folder(tmp_path / "folder")
    int8 = exports(colour_checkpoint) / INT8_FILE
    out = tmp_path / "result.json"
    assert evaluate.main([str(folder), "--weights", str(colour_checkpoint), "--int8", str(int8),
                          "--tta", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"fp32", "int8"} and result["fp32"]["images"] == 10
    (offline,), _, _ = evaluate.predict_offline(folder, colour_checkpoint, tta=1,
                                                precision="int8", int8=int8)
    handler = make_handler(colour_checkpoint, runtime="int8", tta=1)
    assert handler.runtime == "int8"
    served, _ = handle(handler, [{"body": (FIXTURES / f"{n}.jpg").read_bytes()}
                                 for n in CIFAR10_CLASSES])
    assert offline == [next(iter(answer)) for answer in served]


def test_decoded_images_are_cached_until_a_file_changes(tmp_path, monkeypatch):
    folder = fixture_folder(tmp_path / "folder")
    cache = tmp_path / "cache"
    first = data.load_image_folder(folder, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    monkeypatch.setattr(data, "decode_image",
                        lambda body, spec: pytest.fail("decoded again despite the cache"))
    again = data.load_image_folder(folder, cache_dir=cache)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    shutil.copy(FIXTURES / "dog.jpg", folder / "cat" / "0.jpg")  # a file changes: a new key
    monkeypatch.undo()
    changed = data.load_image_folder(folder, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2 and not torch.equal(changed[0], first[0])


def test_the_decoded_image_cache_is_keyed_by_the_decoder_alone():
    """Editing the net, the runtimes or a limit keeps the cache (50,000 images decode in ~20 s to
    2 min); editing the decoder's module (cifar10_serve/images.py) does not."""
    assert data.decoder.__name__ == "cifar10_serve.images"
    assert "def open_image(" in inspect.getsource(data.decoder)
    assert "class Cifar10Net" not in inspect.getsource(data.decoder)


def test_val_size_0_trains_on_every_image(tiny_checkpoint, tmp_path):
    from conftest import TINY_ARGS
    args = TINY_ARGS[:TINY_ARGS.index("--val-size")] + TINY_ARGS[TINY_ARGS.index("--val-size") + 2:]
    out = tmp_path / "all.pt"
    train.train(train.parse_args(["--data-dir", str(tiny_checkpoint.parent / "data"), "--out",
                                  str(out), "--val-size", "0"] + args))
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["train_images"] == 40 and checkpoint["val_size"] == 0
    assert out.with_suffix(".confusion.png").exists()
