"""Train the CIFAR-10 network (cifar10_serve/net.py) and write its checkpoint and plots.

The recipe follows airbench94 (Keller Jordan, cifar10-airbench): whitened first layer, identity-
initialised convs, BatchNorm with only biases trained at their own learning rate, Nesterov SGD with
a warm-up/warm-down schedule, label smoothing, per-sample 2-pixel translation, alternating flips and
a lookahead average of the weights.

    python train.py --data-dir ../shared/data/cifar10/train            # an ImageFolder of images
    python train.py --download-root data                               # torchvision's CIFAR10
    python train.py --data-dir tests/data --epochs 1 --dry-run         # seconds, for tests

The checkpoint (a state_dict plus plain metadata, loadable with weights_only=True) carries what
rebuilds and describes the net: its model spec (cifar10_serve/spec.py: name, classes, the
architecture and its arguments, input size, normalisation), validation accuracy, the command and
the library versions. Beside it go <out>.curve.png and <out>.confusion.png.
"""
import argparse
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm import tqdm

from cifar10_serve.images import eval_transform
from cifar10_serve.net import DEFAULT_WIDTHS, build_net, init_whitening, predict_logits
from cifar10_serve.forwards import cpu_has_bf16
from cifar10_serve.spec import CIFAR10
from data import load_images, split

log = logging.getLogger(__name__)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data-dir", type=Path,
                     help="ImageFolder of training images, one folder per class; without it, "
                          "torchvision downloads CIFAR10")
    src.add_argument("--download-root", type=Path, default=Path("data"),
                     help="where torchvision downloads CIFAR10 when --data-dir is not given")
    p.add_argument("--out", type=Path, default=Path("weights/cifar10.pt"), help="checkpoint path")
    p.add_argument("--name", default=CIFAR10.name,
                   help="the model's name in its spec: its URL (/predictions/NAME) and archive")
    p.add_argument("--epochs", type=int, default=10, help="training epochs")
    p.add_argument("--batch-size", type=int, default=1024, help="training batch size")
    p.add_argument("--lr", type=float, default=11.5, help="peak learning rate per 1024 examples")
    p.add_argument("--momentum", type=float, default=0.85, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=0.0153, help="weight decay per 1024")
    p.add_argument("--bias-scaler", type=float, default=64.0,
                   help="learning-rate multiplier for BatchNorm biases")
    p.add_argument("--label-smoothing", type=float, default=0.2, help="label smoothing")
    p.add_argument("--translate", type=int, default=2,
                   help="largest random translation in pixels (reflect padding)")
    p.add_argument("--cutout", type=int, default=0,
                   help="side of a random square zeroed per training image, 0 for none")
    p.add_argument("--whiten-bias-epochs", type=int, default=3,
                   help="epochs during which the whitening bias is trained")
    p.add_argument("--lookahead-epoch", type=int, default=3,
                   help="epoch from which the lookahead average of the weights is kept")
    p.add_argument("--widths", type=int, nargs=3, default=list(DEFAULT_WIDTHS),
                   help="channels of the three conv groups (default: %(default)s)")
    p.add_argument("--tta", type=int, default=2, choices=[0, 1, 2],
                   help="test-time augmentation for the final validation report")
    p.add_argument("--val-size", type=int, default=5000,
                   help="images held out for validation (a fixed split, independent of --seed); "
                        "0 trains on every image and reports no validation accuracy")
    p.add_argument("--cache-dir", default="data/cache",
                   help="where decoded --data-dir images are kept between runs ('' for nowhere)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only this many images in all, 0 for all")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast precision of the training steps: auto is bf16 on CUDA and on "
                        "CPUs with bf16 units (avx512_bf16 or amx_bf16: ~1.8x faster here), fp32 "
                        "elsewhere; the final validation always runs in fp32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads, 0 for torch's default")
    p.add_argument("--dry-run", action="store_true",
                   help="two batches per epoch: checks the whole path in seconds")
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "train.py"] + (sys.argv[1:] if argv is None else argv))
    return args


def augment(images, epoch, flip_mask, generator, pad=2, cutout=0):
    """Per-sample random translation by up to ``pad`` pixels (reflect padding), airbench's
    alternating flip, and with ``cutout`` a random cutout x cutout square per image set to 0 (the
    mean, in normalised space), clipped at the borders."""
    n, (h, w) = len(images), images.shape[2:]
    padded = nn.functional.pad(images, (pad,) * 4, mode="reflect") if pad else images
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(images.device)
    out = torch.empty_like(images)
    for x in range(2 * pad + 1):
        for y in range(2 * pad + 1):
            pick = (dx == x) & (dy == y)
            out[pick] = padded[pick, :, y:y + h, x:x + w]
    flip = (flip_mask ^ bool(epoch % 2)).to(images.device)  # each image mirrored every other epoch
    out[flip] = out[flip].flip(-1)
    if cutout:
        top = torch.randint(-(cutout // 2), h - cutout // 2, (n, 1, 1), generator=generator)
        left = torch.randint(-(cutout // 2), w - cutout // 2, (n, 1, 1), generator=generator)
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        hole = ((rows >= top) & (rows < top + cutout) & (cols >= left) & (cols < left + cutout))
        out.masked_fill_(hole[:, None].to(images.device), 0)
    return out


def make_optimizer(net, args):
    """Nesterov SGD; BatchNorm biases get their own, larger learning rate (airbench's scaling)."""
    kilostep_scale = 1024 * (1 + 1 / (1 - args.momentum))
    lr = args.lr / kilostep_scale
    wd = args.weight_decay * args.batch_size / kilostep_scale
    lr_biases = lr * args.bias_scaler
    norm_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in net.parameters()
              if p.requires_grad and all(p is not b for b in norm_biases)]
    return torch.optim.SGD([dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
                            dict(params=others, lr=lr, weight_decay=wd / lr)],
                           momentum=args.momentum, nesterov=True)


def lr_factor(step, total_steps):
    """Linear warm-up from 0.2 to 1 over the first 23 % of steps, then down to 0.07."""
    warmup = max(1, int(total_steps * 0.23))
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return 1.0 - 0.93 * (step - warmup) / max(1, total_steps - warmup)


class Lookahead:
    """airbench's lookahead: every few steps the weights are pulled back to a slow average."""

    def __init__(self, net):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items()
                        if v.is_floating_point()}

    @torch.no_grad()
    def update(self, net, decay):
        for key, value in net.state_dict().items():
            if key in self.average:
                self.average[key].lerp_(value, 1 - decay)
                value.copy_(self.average[key])


@torch.no_grad()
def evaluate(net, images, labels, device, spec, tta=0, batch_size=1000, precision="fp32"):
    """Predicted labels for uint8 images, through the same transform the handler uses (the
    spec's). ``net`` may also be any forward callable (an ONNX Runtime session's, as the
    handler's)."""
    with autocast(device, precision):
        preds = logits(net, images, device, spec, tta, batch_size).argmax(1)
    return preds, (preds == labels).float().mean().item() if len(labels) else float("nan")


@torch.inference_mode()
def logits(net, images, device, spec, tta=0, batch_size=1000):
    """fp32 logits (N, classes) on the CPU for uint8 images, normalised by ``spec``, with
    ``tta``'s views."""
    if isinstance(net, nn.Module):
        net.eval()
    transform, parts = eval_transform(spec), []
    for i in range(0, len(images), batch_size):
        x = transform(images[i:i + batch_size]).to(device, memory_format=torch.channels_last)
        parts.append(predict_logits(net, x, tta).float().cpu())
    return torch.cat(parts) if parts else torch.empty(0, len(spec.classes))


def autocast(device, precision):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_precision(precision, device):
    """--precision auto -> bf16 where the device computes it natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"


def train(args):
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # The CIFAR-10 net's input (32x32 RGB, squashed; CIFAR's mean and std), this data's classes.
    spec = CIFAR10.replace(name=args.name, arch_args=dict(widths=list(args.widths)))
    images, labels, classes, source = load_images(args, spec)
    spec = spec.replace(classes=classes)
    train_x, train_y, val_x, val_y = split(images, labels, args.val_size)
    log.info("data: %s, %d train / %d validation images, %d classes, device %s, %s",
             source, len(train_x), len(val_x), len(classes), device, precision)

    train_x = eval_transform(spec)(train_x).to(device)
    train_y = train_y.to(device)
    net = build_net(spec).to(device, memory_format=torch.channels_last)
    init_whitening(net, train_x[:5000])
    optimizer = make_optimizer(net, args)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)  # the last partial batch is dropped
    if args.dry_run:
        steps_per_epoch = min(steps_per_epoch, 2)
    total_steps = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing, reduction="sum")
    lookahead, step = None, 0
    generator = torch.Generator().manual_seed(args.seed)
    flip_mask = torch.rand(len(train_x), generator=generator) < 0.5
    history, start = [], time.perf_counter()

    for epoch in range(args.epochs):
        net.train()
        net.whiten.bias.requires_grad_(epoch < args.whiten_bias_epochs)
        epoch_x = augment(train_x, epoch, flip_mask, generator, args.translate, args.cutout)
        order = torch.randperm(len(train_x), generator=generator)
        seen = correct = loss_sum = 0
        for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}", leave=False):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size].to(device)
            x = epoch_x[idx].contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                logits = net(x)
                loss = loss_fn(logits.float(), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if epoch >= args.lookahead_epoch and step % 5 == 0:
                if lookahead is None:
                    lookahead = Lookahead(net)
                else:  # pull harder towards the slow average as training ends
                    lookahead.update(net, decay=0.95 ** 5 * (step / total_steps) ** 3)
            seen += len(idx)
            correct += (logits.argmax(1) == train_y[idx]).sum().item()
            loss_sum += loss.item()
        if lookahead is not None:
            lookahead.update(net, decay=1.0)
        _, val_acc = evaluate(net, val_x, val_y, device, spec, precision=precision)
        row = dict(epoch=epoch + 1, train_loss=loss_sum / seen, train_acc=correct / seen,
                   val_acc=val_acc, seconds=time.perf_counter() - start)
        history.append(row)
        log.info("epoch %3d | train loss %.4f | train acc %6.2f%% | val acc %6.2f%% | %7.1f s",
                 row["epoch"], row["train_loss"], 100 * row["train_acc"], 100 * val_acc,
                 row["seconds"])
    train_seconds = time.perf_counter() - start

    preds, val_acc = evaluate(net, val_x, val_y, device, spec, tta=args.tta)
    per_class = {c: (preds[val_y == i] == i).float().mean().item() for i, c in enumerate(classes)}
    log.info("validation accuracy with tta=%d: %.2f%% (%d images)", args.tta, 100 * val_acc,
             len(val_y))
    checkpoint = dict(
        state_dict={k: v.cpu() for k, v in net.state_dict().items()}, spec=spec.to_dict(),
        classes=list(spec.classes),  # a copy the spec overrides; proxy.py's v2 metadata reads it
        val_accuracy=val_acc, val_tta=args.tta, val_size=len(val_y),
        per_class_val_accuracy=per_class, history=history, train_seconds=train_seconds,
        train_images=len(train_x), data_source=source, device=str(device), precision=precision,
        machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        command=args.command, args={k: str(v) for k, v in vars(args).items()},
        versions=dict(torch=str(torch.__version__), torchvision=str(torchvision.__version__),
                      python=platform.python_version()),
        finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out)
    write_plots(args.out, history, preds, val_y, classes)
    log.info("wrote %s", args.out)
    return checkpoint


def write_plots(out, history, preds, labels, classes):
    """<out>.curve.png (loss and accuracy per epoch) and <out>.confusion.png (validation)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="train loss (label-smoothed)", title="Training loss")
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], marker="o", label="train")
    ax_acc.plot(epochs, [100 * h["val_acc"] for h in history], marker="o", label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (no TTA)")
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".curve.png"), dpi=100)
    plt.close(fig)

    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (labels.numpy(), preds.numpy()), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Validation confusion matrix")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, count, ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black", fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".confusion.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train(parse_args())
