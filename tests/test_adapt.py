"""docs/own-model.md, followed as written: a model spec, `make convert`, `make archive`,
served by a real TorchServe, with no edit under cifar10_serve/ or handler/.

Two models unlike the CIFAR-10 net: (a) a torchvision ResNet-18 (224x224 RGB, ImageNet's mean and
std, shorter side to 256 then the centre 224, 100 classes) and (b) a net of the user's own
(tiny_net.py, shipped in the archive with EXTRA_FILES), 1-channel 48x64, squashed, 7 classes.
Both with seeded random weights. Each is archived twice: as the user would (runtime auto, which
must pass its golden check on this CPU) and with `runtime: torch` under another name, whose answers
must equal eager PyTorch's on preprocessing written here with torchvision and PIL (fp32, 1e-4).
A maximal legal explanation request (the worker's own figure) must finish with the worker alive.
"""
import base64
import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from conftest import ROOT
from PIL import Image

from tests.harness import local_proxy, local_torchserve

RESNET = {"name": "resnet18", "architecture": "resnet18",
          "classes": [f"class{i:03d}" for i in range(100)],
          "image_size": [224, 224], "channels": 3, "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "resize": "crop", "resize_to": 256}
TINY = {"name": "tiny-gray", "architecture": "tiny_net:TinyNet",
        "classes": ["anger", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
        "image_size": [48, 64], "channels": 1, "mean": [0.5], "std": [0.25]}
TINY_NET = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))
'''
# (width, height), mode: photos of other shapes than the model's, greyscale and alpha among them
SHAPES = [((300, 200), "RGB"), ((180, 320), "RGB"), ((256, 256), "L"), ((97, 61), "RGBA")]


def png(size, mode, seed):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(pixels).resize((8, 8)).resize(size, Image.BILINEAR))
    buffer = io.BytesIO()  # noise over a smooth field: different images get different answers
    Image.fromarray((smooth // 2 + pixels // 2).astype(np.uint8)).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def image_folder(root, count, seed):
    root.mkdir()
    for i in range(count):
        size, mode = SHAPES[i % len(SHAPES)]
        (root / f"{i}.png").write_bytes(png(size, mode, seed + i))
    return root


def make(*args):
    subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], check=True)


def model_config(path, **handler):
    """handler/model-config.yaml for a small test machine shared with other work, as a user with
    a larger model would adapt it: one worker; Integrated Gradients at 8 steps (a ResNet-18's 32
    take seconds of CPU per image) and responseTimeout 30 s, so that the largest explanation the
    budget admits (half of responseTimeout at most, in CPU time) still ends in time while the
    worker waits for a core; and ``handler`` set."""
    config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    config.update(minWorkers=1, maxWorkers=1, responseTimeout=30)
    config["handler"].update(tta=0, ig_steps=8, **handler)
    path.write_text(yaml.safe_dump(config))
    return path


def resnet_reference(weights, body):
    """Eager ResNet-18 probabilities on torchvision's own ImageNet eval preprocessing."""
    import torchvision
    from torchvision import transforms

    net = torchvision.models.resnet18(num_classes=100)
    net.load_state_dict(torch.load(weights, weights_only=True))
    preprocess = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(RESNET["mean"], RESNET["std"])])
    x = preprocess(Image.open(io.BytesIO(body)).convert("RGB"))[None]
    with torch.inference_mode():
        return net.eval()(x).softmax(1)[0]


def tiny_net_class(folder):
    """The user's TinyNet from folder/tiny_net.py, imported by path (sys.path stays as it is)."""
    loader = importlib.util.spec_from_file_location("tiny_net", Path(folder) / "tiny_net.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module.TinyNet


def tiny_reference(weights, body, folder):
    """Eager TinyNet probabilities on greyscale, squashed to 64x48, normalised by hand."""
    net = tiny_net_class(folder)(num_classes=7)
    net.load_state_dict(torch.load(weights, weights_only=True))
    image = Image.open(io.BytesIO(body)).convert("L").resize((64, 48), Image.BILINEAR)
    x = (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255) - 0.5) / 0.25
    with torch.inference_mode():
        return net.eval()(x[None, None]).softmax(1)[0]


@pytest.fixture(scope="module")
def own_models(tmp_path_factory):
    """Both models converted and archived as README says, each also as <name>-fp32 with
    `runtime: torch`, in one model store: {name: (spec, its state_dict file)}, the store."""
    tmp = tmp_path_factory.mktemp("adapt")
    store, models = tmp / "store", {}
    calibration, check = image_folder(tmp / "calib", 8, 0), image_folder(tmp / "check", 8, 100)
    auto, fp32 = model_config(tmp / "auto.yaml"), model_config(tmp / "fp32.yaml", runtime="torch")
    (tmp / "tiny_net.py").write_text(TINY_NET)
    import torchvision

    torch.manual_seed(0)
    nets = {"resnet18": torchvision.models.resnet18(num_classes=100),
            "tiny-gray": tiny_net_class(tmp)(num_classes=7)}
    for spec in (RESNET, TINY):
        name = spec["name"]
        (tmp / f"{name}.json").write_text(json.dumps(spec))
        torch.save(nets[name].state_dict(), tmp / f"{name}.state.pt")
        extra = [f"EXTRA_FILES={tmp / 'tiny_net.py'}"] if name == "tiny-gray" else []
        weights = tmp / f"{name}.pt"
        make("convert", f"SPEC={tmp / f'{name}.json'}", f"STATE_DICT={tmp / f'{name}.state.pt'}",
             f"WEIGHTS={weights}", *extra)
        common = [f"WEIGHTS={weights}", f"MODEL_STORE={store}", f"CALIB_DIR={calibration}",
                  f"CHECK_DIR={check}", *extra]
        make("archive", *common, f"MODEL_CONFIG={auto}")
        make("archive", *common, f"MODEL_CONFIG={fp32}", f"MODEL_NAME={name}-fp32")
        models[name] = tmp / f"{name}.state.pt"
    return models, store, tmp


@pytest.fixture(scope="module")
def served(own_models, tmp_path_factory):
    """One TorchServe (free ports) serving the four archives; (clients by model name, run dir)."""
    models, store, tmp = own_models
    names = tuple(n for name in models for n in (name, f"{name}-fp32"))
    run = tmp_path_factory.mktemp("run")
    with local_torchserve(store, run, timeout=600, probe=png((40, 30), "RGB", 9),
                          models=names) as client:
        yield client.clients, run


def customized(client):
    """The handler's own describe (runtime, budget), and the model's workers."""
    response = client._call("GET", f"{client.management}/models/{client.model}", "management",
                            params={"customized": "true"}, timeout=30)
    assert response.ok, response.text
    described = response.json()[0]
    custom = described["customizedMetadata"]
    return json.loads(custom) if isinstance(custom, str) else custom, described["workers"]


@pytest.mark.parametrize("name", ["resnet18", "tiny-gray"])
def test_own_model_answers_as_eager_torch(own_models, served, name):
    models, _, tmp = own_models
    clients, _ = served
    reference = {"resnet18": resnet_reference,
                 "tiny-gray": lambda w, b: tiny_reference(w, b, tmp)}[name]
    classes = (RESNET if name == "resnet18" else TINY)["classes"]
    answers = []
    for i, (size, mode) in enumerate(SHAPES):
        body = png(size, mode, 1000 + i)
        response = clients[f"{name}-fp32"].predict(body)
        assert response.status_code == 200, response.text
        answer = response.json()
        want = reference(models[name], body)
        assert len(answer) == 5 and list(answer) == [classes[k] for k in want.topk(5).indices]
        assert list(answer.values()) == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)
        answers.append(answer)
        auto = clients[name].predict(body)  # the archive as built: runtime auto
        assert auto.status_code == 200 and set(auto.json()) <= set(classes), auto.text
    assert len({json.dumps(a) for a in answers}) == len(answers)  # no two images alike


@pytest.mark.parametrize("name", ["resnet18", "tiny-gray"])
def test_own_model_runtime_auto_passes_its_golden_check(served, name):
    clients, run = served
    described, _ = customized(clients[name])
    assert described["classes"] == (RESNET if name == "resnet18" else TINY)["classes"]
    log = (run / "logs" / "model_log.log").read_text()
    assert f"runtime auto -> {described['runtime']}" in log
    assert "does not give the archive's golden answers" not in log


@pytest.mark.parametrize("name", ["resnet18", "tiny-gray"])
def test_own_model_explains_the_largest_legal_request(served, name):
    """As many images as the worker says fit an explanation (its own figure, at most
    max_explain_images), explained in one request; the worker stays up, the same process."""
    clients, _ = served
    described, workers = customized(clients[name])
    largest = described["budget"]["largest_request_images"]["explain"]
    assert 1 <= largest <= described["limits"]["max_explain_images"]
    height, width = (RESNET if name == "resnet18" else TINY)["image_size"]
    client = clients[name]
    images = [base64.b64encode(png((50 + 7 * i, 40), "RGB", i)).decode() for i in range(largest)]
    response = client._infer(f"{client.inference}/explanations/{name}", json={"data": images})
    assert response.status_code == 200, response.text
    found = response.json()
    assert len(found) == largest
    for one in found:
        assert np.asarray(one["attributions"]).shape == (height, width)
    _, after = customized(clients[name])
    assert [(w["pid"], w["status"]) for w in after] == [(w["pid"], "READY") for w in workers]


# --- the spec's decoding and the registry, without a server ------------------------------------

def test_crop_decodes_as_torchvision_resize_and_centre_crop():
    from torchvision import transforms

    from cifar10_serve.images import decode_image, image_tensor
    from cifar10_serve.spec import from_dict

    spec = from_dict(RESNET)
    reference = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.PILToTensor()])
    for i, (size, mode) in enumerate(SHAPES + [((225, 1000), "RGB"), ((257, 255), "RGB")]):
        body = png(size, mode, i)
        want = reference(Image.open(io.BytesIO(body)).convert("RGB"))
        assert torch.equal(image_tensor(decode_image(body, spec)), want), size


def test_large_jpegs_decode_at_a_reduced_scale_to_the_spec_shape():
    """Draft mode decodes a 4000x3000 JPEG at 1/8 (500x375), still larger than what the crop
    needs, then resizes and crops to the spec's size; a 1-channel spec gets one channel."""
    from cifar10_serve.images import decode_image, image_tensor, open_image
    from cifar10_serve.spec import from_dict

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png((400, 300), "RGB", 3))).resize((4000, 3000)).save(buffer, "JPEG")
    image = open_image(buffer.getvalue())
    image.draft("RGB", (341, 256))
    assert image.size == (500, 375)
    assert image_tensor(decode_image(buffer.getvalue(), from_dict(RESNET))).shape == (3, 224, 224)
    assert image_tensor(decode_image(buffer.getvalue(), from_dict(TINY))).shape == (1, 48, 64)


def test_the_cifar_net_is_built_without_importing_torchvision():
    code = ("import sys; from cifar10_serve.net import build_net; "
            "from cifar10_serve.spec import CIFAR10; build_net(CIFAR10); "
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_unknown_architectures_name_the_forms_accepted():
    from cifar10_serve.net import build_net
    from cifar10_serve.spec import from_dict

    for name, fragment in (("resnet1800", "torchvision classifier"),
                           ("no_such_module:Net", "cannot import Net")):
        with pytest.raises(ValueError, match=fragment):
            build_net(from_dict({**TINY, "architecture": name}))


@pytest.mark.parametrize("name", ["resnet18", "tiny-gray"])
def test_own_model_is_served_through_the_proxy_with_its_own_v2_metadata(served, name,
                                                                        tmp_path):
    """The proxy routes the model by its spec's name; its v2 metadata is the model's own answer:
    the spec's shape (H, W, C) and classes; /predictions through the proxy answers as
    TorchServe does."""
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("needs nginx (apt-get install nginx)")
    clients, _ = served
    spec = RESNET if name == "resnet18" else TINY
    client = clients[name]
    with local_proxy(client, tmp_path / "proxy") as front:
        headers = client._token("inference")
        metadata = requests.get(f"{front.inference}/v2/models/{name}", headers=headers,
                                timeout=60)
        assert metadata.status_code == 200, metadata.text
        described = metadata.json()
        assert described["name"] == name
        assert [-1, *spec["image_size"], spec["channels"]] in [
            t["shape"] for t in described["inputs"]]
        (probabilities,) = [t for t in described["outputs"] if t["name"] == "probabilities"]
        assert probabilities["shape"] == [-1, len(spec["classes"])]
        assert probabilities["parameters"]["classes"] == spec["classes"]
        body = png((120, 90), "RGB", 77)
        direct = client.predict(body)
        through = requests.post(f"{front.inference}/predictions/{name}", data=body,
                                headers=headers, timeout=60)
        assert through.status_code == 200, through.text
        assert through.json() == pytest.approx(direct.json(), abs=1e-6)
        other = requests.post(f"{front.inference}/predictions/cifar10", data=body,
                              headers=headers, timeout=60)
        assert other.status_code == 404  # the proxy routes the served model only
