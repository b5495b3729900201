"""Score a model (the CIFAR-10 one, or any checkpoint with a spec) on an ImageFolder: overall and
per-class top-1 accuracy.

Either a weights file in-process (the training eval path), or a running TorchServe over REST (the
served path, preprocessing included), one request per image:

    python evaluate.py path/to/test --weights weights/cifar10.pt [--tta 0] [--precision fp32]
    python evaluate.py path/to/test --weights weights/cifar10.pt --int8 model_store/build/cifar10/cifar10.int8.onnx
    python evaluate.py path/to/test --url http://127.0.0.1:8080     # token from key_file.json

Folder names must be the model's class names (airplane, automobile, ... for CIFAR-10), as in
torchvision's ImageFolder; images are decoded and normalised as the checkpoint's spec says.
"""
import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torchvision
import yaml
from tqdm import tqdm

import calibration
import data
import train
from cifar10_serve import spec as specs
from cifar10_serve.images import eval_transform
from cifar10_serve.net import build_net, tta_views
from cifar10_serve.forwards import onnx_forward
from client import TorchServeClient

log = logging.getLogger(__name__)


def served(setting, default):
    """A handler setting as model-config.yaml serves it (tta, tta_margin)."""
    config = yaml.safe_load((Path(__file__).parent / "handler" / "model-config.yaml").read_text())
    return config.get("handler", {}).get(setting, default)


def load_net(weights, device="cpu"):
    """A checkpoint written by train.py or convert.py -> (eval-mode net on device, its spec)."""
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    spec = specs.from_checkpoint(checkpoint)
    net = build_net(spec, checkpoint["state_dict"])
    return net.to(device, memory_format=torch.channels_last).eval(), spec


def predict_offline(root, weights, tta=0, device="cpu", holdout=0, precision="fp32", int8=None,
                    margins=(1.0,)):
    """(predicted class names per margin, true class names, forwards per image per margin) for
    every image under root, in-process, with the forward in ``precision``: fp32, bf16 autocast
    (the handler's `runtime: bf16`), or int8, ONNX Runtime on the quantized export ``int8``
    (`runtime: int8`); gated TTA (cifar10_serve.net.gated_logits) at each of ``margins``."""
    net, spec = load_net(weights, device)
    images, labels, folder_classes, _ = data.load_image_folder(root, spec=spec)
    if holdout:
        _, _, images, labels = data.split(images, labels, holdout)
    classes = spec.classes
    if precision == "int8":
        net, precision = onnx_forward(int8, torch.get_num_threads()), "fp32"
    with train.autocast(torch.device(device), precision):
        plain = train.logits(net, images, torch.device(device), spec, tta=0)
        full = train.logits(net, images, torch.device(device), spec, tta=tta) if tta else plain
    top2 = plain.float().softmax(1).topk(2, dim=1).values
    lead, views = top2[:, 0] - top2[:, 1], len(tta_views(images[:1], tta)[0]) if tta else 1
    preds, forwards = [], []
    for margin in margins:  # the gate's choice per image: the full views' logits, or the first's
        unsure = lead < margin
        preds.append([classes[i] for i in torch.where(unsure[:, None], full, plain).argmax(1)])
        forwards.append(1 + (views - 1) * unsure.float().mean().item())
    return preds, [folder_classes[i] for i in labels.tolist()], forwards


def predict_served(root, client, concurrency=8, holdout=0):
    """(predicted class names, true class names) from the server, one request per image."""
    folder = torchvision.datasets.ImageFolder(str(root), loader=lambda path: path)
    if holdout:
        folder.samples = [folder.samples[i] for i in
                          data.split_indices(len(folder.samples), holdout)[1].tolist()]

    def top1(path):
        response = client.predict(Path(path))
        response.raise_for_status()
        return next(iter(response.json()))

    with ThreadPoolExecutor(concurrency) as pool:
        preds = list(tqdm(pool.map(top1, [p for p, _ in folder.samples]),
                          total=len(folder.samples), desc="REST", leave=False))
    return preds, [folder.classes[label] for _, label in folder.samples]


def report(preds, truth):
    """Overall and per-class accuracy as a dict, and printed as a table."""
    classes = sorted(set(truth))
    per_class = {c: sum(p == t for p, t in zip(preds, truth) if t == c) /
                 sum(t == c for t in truth) for c in classes}
    overall = sum(p == t for p, t in zip(preds, truth)) / len(truth)
    print(f"{'class':<12} {'accuracy':>9}")
    for c in classes:
        print(f"{c:<12} {100 * per_class[c]:8.2f}%")
    print(f"{'overall':<12} {100 * overall:8.2f}%  ({len(truth)} images)")
    return dict(overall=overall, per_class=per_class, images=len(truth))


def margin_table(args, precision, preds, truth, forwards):
    """Accuracy and forwards per image at each --tta-margin, printed as a table and returned."""
    print(f"\n{args.weights}, {precision}, tta {args.tta}, {len(truth)} images of "
          f"{args.data_dir}\n\n| tta_margin | forwards per image | accuracy |\n|--:|--:|--:|")
    rows = []
    for margin, answers, cost in zip(args.tta_margin, preds, forwards):
        accuracy = sum(p == t for p, t in zip(answers, truth)) / len(truth)
        print(f"| {margin:g} | {cost:.3f} | {100 * accuracy:.2f} % |")
        rows.append(dict(tta_margin=margin, forwards_per_image=cost, overall=accuracy))
    return rows


def calibration_report(args, precisions):
    """ECE (15 bins), NLL, accuracy and mean top-1 probability of the served forward of each
    precision (gated TTA as --tta and --tta-margin), before calibration (T 1) and after (the
    checkpoint's spec.temperature, as the handler divides by it), printed as a table; with
    --calibration PNG, their reliability diagrams there. Returns the figures as a dict."""
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    spec = specs.from_checkpoint(checkpoint)
    images, labels = calibration.held_out(args.data_dir, spec, args.holdout)
    transform, margin = eval_transform(spec), args.tta_margin[0]
    rows, panels, result = [], [], {}
    for precision in precisions:
        logits = calibration.served_logits(
            calibration.runtime_forward(checkpoint, precision, args.int8), images, transform,
            args.tta, margin)
        result[precision] = {}
        for when, temperature in (("before", 1.0), ("after", spec.temperature)):
            found = calibration.scores(logits, labels, temperature)
            result[precision][when] = dict(found, temperature=temperature)
            rows.append((f"{precision}, {when} calibration", f"{temperature:.4f}", found))
            panels.append((f"{precision} {when} calibration (T {temperature:.4f}), tta {args.tta} "
                           f"gated at {margin:g}",
                           (logits.double() / temperature).softmax(1), labels))
    print(f"\n{args.weights}, {len(labels)} images of {args.data_dir}\n")
    calibration.table(rows)
    if args.calibration:
        calibration.diagram(panels, args.calibration)
        print(f"wrote {args.calibration}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_dir", type=Path, help="ImageFolder to score")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", type=Path, help="checkpoint written by train.py or convert.py")
    src.add_argument("--url", help="TorchServe inference address, e.g. http://127.0.0.1:8080")
    p.add_argument("--tta", type=int, default=served("tta", 0), choices=[0, 1, 2],
                   help="test-time augmentation for --weights; by default model-config.yaml's, "
                        "as served")
    p.add_argument("--tta-margin", type=float, nargs="+", default=[served("tta_margin", 1.0)],
                   help="gated TTA for --weights: the extra views only for images whose top-1 "
                        "leads by less than this (1: every image); several values: a table of "
                        "accuracy and forwards per image; by default model-config.yaml's")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], action="append",
                   help="forward precision for --weights, repeatable; by default fp32, and int8 "
                        "with --int8 (the served default)")
    p.add_argument("--int8", type=Path,
                   help="the int8 ONNX file `make archive` wrote, for --precision int8")
    p.add_argument("--key-file", default="key_file.json", help="TorchServe's token file")
    p.add_argument("--model", default="cifar10", help="the served model's name, for --url")
    p.add_argument("--concurrency", type=int, default=8, help="parallel requests for --url")
    p.add_argument("--holdout", type=int, default=0,
                   help="score only the validation split of this size that train.py holds out "
                        "of data_dir (its --val-size), 0 for every image")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    p.add_argument("--calibration", type=Path, metavar="PNG",
                   help="for --weights, also ECE and NLL before and after the checkpoint's "
                        "temperature per precision, and their reliability diagram here")
    args = p.parse_args(argv)
    if args.weights:
        precisions = args.precision or (["fp32", "int8"] if args.int8 else ["fp32"])
        if "int8" in precisions and not args.int8:
            p.error("--precision int8 needs --int8 FILE")
        result = {}
        for precision in precisions:
            preds, truth, forwards = predict_offline(
                args.data_dir, args.weights, args.tta, holdout=args.holdout, precision=precision,
                int8=args.int8, margins=args.tta_margin)
            if len(args.tta_margin) == 1:
                print(f"{args.weights}, {precision}, tta {args.tta}, tta_margin "
                      f"{args.tta_margin[0]} ({forwards[0]:.2f} forwards per image):")
                result[precision] = report(preds[0], truth)
            else:
                result[precision] = margin_table(args, precision, preds, truth, forwards)
        if args.calibration:
            result["calibration"] = calibration_report(args, precisions)
    else:
        client = TorchServeClient(key_file=args.key_file, model=args.model)
        client.inference = args.url.rstrip("/")
        preds, truth = predict_served(args.data_dir, client, args.concurrency, args.holdout)
        result = report(preds, truth)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
