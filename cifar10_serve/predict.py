"""The forward passes of a batch: every predict row's images through the chosen forward in chunks of
at most batchSize images (with the configured TTA), Integrated Gradients for explain rows; a group
that fails is retried row by row, so a failure stays the failing request's own 500."""
import logging

import torch

from cifar10_serve.net import gated_logits

logger = logging.getLogger(__name__)


def to_batch(images, transform, device):
    """Decoded uint8 images -> the normalised channels-last batch the forward takes."""
    batch = transform(torch.stack(images).to(device))  # uint8 crosses to a GPU: 4x fewer bytes
    return batch.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def probabilities(rows, forward, transform, device, chunk, tta, margin=1.0, temperature=1.0):
    """(per row, its images' class probabilities (N, classes) on the CPU; how many images took
    the TTA views: all of them, or with ``margin`` < 1 those the first look left unsure)."""
    images = [image for row in rows for image in row.images]
    parts, looked = [], 0
    for start in range(0, len(images), chunk):
        batch = to_batch(images[start:start + chunk], transform, device)
        logits, second = gated_logits(forward, batch, tta, margin)
        parts.append((logits.float() / temperature).softmax(dim=1).cpu())  # the spec's T
        looked += second
    return torch.split(torch.cat(parts), [len(row.images) for row in rows]), looked


def explanations(row, net, targets, transform, device, chunk, steps, classes):
    """Per image of the row, its class (``targets``: the served prediction's, so an explanation
    names what /predictions answers) and a 32x32 map of Captum Integrated Gradients attributions
    (summed over colour channels) of the fp32 net for it. Captum is imported here, so
    predictions never pay for it."""
    from captum.attr import IntegratedGradients

    answers = []
    for start in range(0, len(row.images), chunk):
        batch = to_batch(row.images[start:start + chunk], transform, device)
        target = targets[start:start + chunk].to(device)
        attributions = IntegratedGradients(net).attribute(
            batch, target=target, n_steps=steps, internal_batch_size=256)
        answers += [{"class": classes[t], "attributions": a.tolist()}
                    for t, a in zip(target.tolist(), attributions.sum(dim=1))]
    return answers


def run_isolated(group, run):
    """Run the group together; if that fails, each row alone, so a failure stays its own."""
    try:
        run(group)
        return
    except Exception:  # noqa: BLE001
        logger.exception("a %s batch of %d requests failed; retrying them one by one",
                         group[0].kind, len(group))
    for row in group:
        try:
            run([row])
        except Exception:  # noqa: BLE001
            logger.exception("a %s request failed", row.kind)
            row.error = (500, f"the server failed while answering this {row.kind} request "
                              f"(logged)")
