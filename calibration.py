"""How far the served probabilities are from the truth, and the temperature that brings them closer.

    python calibration.py weights/cifar10.pt tests/holdout            # fit and report only
    python calibration.py weights/cifar10.pt tests/holdout --write    # store T in the checkpoint

The metrics (expected calibration error over 15 equal-width confidence bins, negative
log-likelihood, a reliability diagram) and the fit: one temperature T, probabilities =
softmax(logits / T), chosen to minimise the NLL of the served forward's logits (model-config.yaml's
tta and tta_margin) on a held-out split, by LBFGS on log T. Fitted and scored on the same images,
ECE flatters T, so it is also reported cross-fitted: the split in two halves, each scored at the
temperature fitted on the other. --write stores T in the checkpoint's spec (``temperature``),
which every forward of the handler divides the logits by, and the fit's figures beside it
(``calibration``). evaluate.py reports the same metrics per runtime.

Build-time code: not shipped in the .mar.
"""
import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

import data
from cifar10_serve import spec as model_spec
from cifar10_serve.images import eval_transform
from cifar10_serve.net import build_net, gated_logits
from cifar10_serve.forwards import bf16_forward, cpu_flags, cpu_name, onnx_forward

BINS = 15
# The temperature a fit may return: outside it the logits are degenerate (all one class, or ties).
T_RANGE = (0.05, 20.0)


def reliability(probs, labels, bins=BINS):
    """Per confidence bin ((i/bins, (i+1)/bins], by the top-1 probability): (images, mean
    top-1 probability, accuracy), as three tensors of ``bins`` values (0 where a bin is empty)."""
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == labels).float()
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1
    count = torch.zeros(bins).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(bins).index_add_(0, index, confidence)
    right = torch.zeros(bins).index_add_(0, index, correct)
    filled = count.clamp(min=1)
    return count, conf_sum / filled, right / filled


def ece(probs, labels, bins=BINS):
    """Expected calibration error: the images' share-weighted |accuracy - confidence| per bin."""
    count, confidence, accuracy = reliability(probs, labels, bins)
    return ((count / count.sum()) * (accuracy - confidence).abs()).sum().item()


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    return F.cross_entropy(logits.double() / temperature, labels).item()


def fit_temperature(logits, labels):
    """The T that minimises nll(logits, labels, T): LBFGS on log T (NLL is convex in 1/T)."""
    logits = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1, max_iter=100, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(*T_RANGE))


def fit_confidence(logits, labels):
    """The T at which the mean top-1 probability equals the accuracy (bisection on log T; the
    mean top-1 probability falls as T rises). ECE is at least |mean top-1 probability -
    accuracy|, whatever the bins."""
    logits = logits.double()
    accuracy = (logits.argmax(1) == labels).double().mean()
    low, high = T_RANGE
    for _ in range(60):
        middle = (low * high) ** 0.5
        if (logits / middle).softmax(1).max(1).values.mean() > accuracy:
            low = middle
        else:
            high = middle
    return (low * high) ** 0.5


FITS = {"confidence": fit_confidence, "nll": fit_temperature}


def cross_fitted(logits, labels, fit=fit_confidence, folds=2, seed=0):
    """(each fold's T by ``fit``, every image's logits divided by the T fitted without its
    fold): scores of calibration that did not see the images it is scored on."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    scaled, temperatures = torch.empty_like(logits, dtype=torch.float64), []
    for k, held in enumerate(parts):
        fit_on = torch.cat([p for j, p in enumerate(parts) if j != k])
        temperatures.append(fit(logits[fit_on], labels[fit_on]))
        scaled[held] = logits[held].double() / temperatures[-1]
    return temperatures, scaled


def scores(logits, labels, temperature=1.0):
    """{"ece", "nll", "accuracy", "confidence"} of softmax(logits / temperature)."""
    probs = (logits.double() / temperature).softmax(1)
    return dict(ece=ece(probs, labels), nll=nll(logits, labels, temperature),
                accuracy=(probs.argmax(1) == labels).double().mean().item(),
                confidence=probs.max(1).values.mean().item())


@torch.inference_mode()
def served_logits(forward, images, transform, tta, margin, chunk=250):
    """fp32 logits (N, classes) of uint8 images through ``forward`` as the handler runs it:
    channels-last batches, gated TTA (cifar10_serve.net.gated_logits)."""
    parts = []
    for start in range(0, len(images), chunk):
        x = transform(images[start:start + chunk]).contiguous(memory_format=torch.channels_last)
        parts.append(gated_logits(forward, x, tta, margin)[0].float())
    return torch.cat(parts)


def runtime_forward(checkpoint, precision, int8=None, threads=None):
    """The forward of ``precision``: fp32, the torch net; bf16, it under bf16 autocast; int8,
    ONNX Runtime on the ``int8`` file (the handler's torch, bf16 and int8 runtimes)."""
    net = build_net(checkpoint).to(memory_format=torch.channels_last).eval()
    if precision == "fp32":
        return net
    if precision == "bf16":
        return bf16_forward(net)
    if precision == "int8":
        if int8 is None:
            raise ValueError("the int8 forward needs the int8 ONNX file (make archive writes it)")
        return onnx_forward(int8, threads or torch.get_num_threads())
    raise ValueError(f"unknown precision {precision!r}: fp32, bf16 or int8")


def held_out(root, spec, holdout=0):
    """(uint8 images, labels as indices of spec.classes) of the ImageFolder ``root`` (only the
    validation split train.py's --val-size ``holdout`` keeps out of it, where given)."""
    images, labels, folder_classes, _ = data.load_image_folder(root)
    if holdout:
        _, _, images, labels = data.split(images, labels, holdout)
    unknown = set(folder_classes) - set(spec.classes)
    if unknown:
        raise ValueError(f"{root}: folders {sorted(unknown)} are none of the model's classes")
    index = torch.tensor([spec.classes.index(c) for c in folder_classes])
    return images, index[labels]


def diagram(panels, path, bins=BINS):
    """A reliability diagram PNG: per panel (title, probabilities, labels), accuracy per
    confidence bin (its images counted at its foot), with the diagonal a calibrated model
    follows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(9, 4.3 * rows), squeeze=False)
    centres = ((torch.arange(bins) + 0.5) / bins).numpy()
    for ax, (title, probs, labels) in zip(axes.flat, panels):
        count, confidence, accuracy = (t.numpy() for t in reliability(probs, labels, bins))
        shown = count > 0
        ax.bar(centres[shown], accuracy[shown], width=1 / bins, edgecolor="black",
               color="tab:blue", alpha=0.8, label="accuracy")
        ax.bar(centres[shown], (confidence - accuracy)[shown], bottom=accuracy[shown],
               width=1 / bins, edgecolor="tab:red", color="tab:red", alpha=0.25,
               label="gap to confidence")
        for x, n in zip(centres[shown], count[shown]):  # a bin of 4 images says little
            ax.text(x, 0.01, f"{n:.0f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="calibrated")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 probability", ylabel="accuracy",
               title=f"{title}\nECE {100 * ece(probs, labels, bins):.2f} %, "
                     f"{len(labels)} images")
        ax.legend(loc="upper left", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ece_floor(probs, draws=200, seed=0, bins=BINS):
    """(mean, 90th percentile) of the ECE that a perfectly calibrated forward giving ``probs``
    scores on this many images: each draw's labels sampled from the probabilities themselves.
    What ECE cannot tell from zero on a split this size (~2 % on 500 images here)."""
    generator = torch.Generator().manual_seed(seed)
    found = torch.tensor([ece(probs, torch.multinomial(probs.float(), 1, generator=generator)
                              .squeeze(1), bins) for _ in range(draws)])
    return found.mean().item(), found.quantile(0.9).item()


def table(rows):
    """Rows (forward, T, scores) -> a printed markdown table."""
    print("| forward | T | ECE (15 bins) | NLL | accuracy | mean top-1 probability |\n"
          "|---|--:|--:|--:|--:|--:|")
    for label, temperature, s in rows:
        print(f"| {label} | {temperature} | {100 * s['ece']:.2f} % | {s['nll']:.4f} | "
              f"{100 * s['accuracy']:.2f} % | {s['confidence']:.4f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("weights", type=Path, help="checkpoint written by train.py")
    p.add_argument("data_dir", type=Path, help="held-out ImageFolder to fit on (tests/holdout)")
    p.add_argument("--holdout", type=int, default=0,
                   help="fit only on the validation split of this size that train.py holds out "
                        "of data_dir (its --val-size), 0 for every image")
    p.add_argument("--objective", choices=sorted(FITS), default="confidence",
                   help="what T is fitted for: confidence, the mean top-1 probability equal to "
                        "the accuracy; nll, the least negative log-likelihood")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="the forward whose logits T is fitted to")
    p.add_argument("--int8", type=Path, help="the int8 ONNX file, for --precision int8")
    p.add_argument("--tta", type=int, default=None, help="by default model-config.yaml's")
    p.add_argument("--tta-margin", type=float, default=None, help="by default model-config.yaml's")
    p.add_argument("--write", action="store_true",
                   help="store T in the checkpoint's spec (and the fit's figures beside it)")
    args = p.parse_args(argv)
    from evaluate import served  # noqa: PLC0415  (model-config.yaml's handler settings)

    tta = served("tta", 0) if args.tta is None else args.tta
    margin = served("tta_margin", 1.0) if args.tta_margin is None else args.tta_margin
    checkpoint = torch.load(args.weights, map_location="cpu", weights_only=True)
    spec = model_spec.from_checkpoint(checkpoint)
    images, labels = held_out(args.data_dir, spec, args.holdout)
    logits = served_logits(runtime_forward(checkpoint, args.precision, args.int8), images,
                           eval_transform(spec), tta, margin)
    print(f"{args.weights}, {args.precision}, tta {tta}, tta_margin {margin}, {len(labels)} "
          f"images of {args.data_dir}; {cpu_name()}\n")
    rows, fits = [("uncalibrated", "1", scores(logits, labels))], {}
    for objective, fit in FITS.items():
        fold_t, crossed = cross_fitted(logits, labels, fit)
        fits[objective] = dict(temperature=fit(logits, labels), cross_fitted_temperatures=fold_t,
                               cross_fitted=scores(crossed, labels))
        fits[objective]["fitted"] = scores(logits, labels, fits[objective]["temperature"])
        rows += [(f"{objective}: cross-fitted (2 halves, each at the other's T)",
                  " / ".join(f"{t:.4f}" for t in fold_t), fits[objective]["cross_fitted"]),
                 (f"{objective}: fitted on all, scored on them",
                  f"{fits[objective]['temperature']:.4f}", fits[objective]["fitted"])]
    table(rows)
    chosen = fits[args.objective]
    floor = ece_floor((logits.double() / chosen["temperature"]).softmax(1))
    print(f"\nECE a perfectly calibrated forward would score on these {len(labels)} images "
          f"(labels drawn from its own probabilities at T {chosen['temperature']:.4f}): "
          f"{100 * floor[0]:.2f} % on average, {100 * floor[1]:.2f} % at the 90th percentile")
    if args.write:
        checkpoint["spec"] = spec.replace(temperature=chosen["temperature"]).to_dict()
        checkpoint["calibration"] = dict(
            method=f"temperature scaling, objective {args.objective}",
            command=shlex.join(["python", "calibration.py", *(argv or sys.argv[1:])]),
            date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            data=str(args.data_dir), holdout=args.holdout, images=len(labels),
            precision=args.precision, tta=tta, tta_margin=margin,
            uncalibrated=rows[0][2], fits=fits, ece_floor=list(floor), cpu=cpu_name(),
            cpu_flags=cpu_flags())
        tmp = args.weights.with_suffix(".tmp")
        torch.save(checkpoint, tmp)
        tmp.replace(args.weights)
        print(f"\nwrote temperature {chosen['temperature']:.4f} ({args.objective}) into "
              f"{args.weights}'s spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
