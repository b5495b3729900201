"""Serving an image classifier with TorchServe: the package that handler/cifar10_handler.py (the
class TorchServe loads) works through, shipped inside the .mar beside it. A batch passes, in order:

    torchserve_adapter.py  detect: how TorchServe 0.12 presents each request (its row, the headers
                           its routes add, KServe envelopes) -> its kind and protocol; and back:
                           answers, statuses and headers through TorchServe's context; the
                           patches of its worker (the only module that changes anything on import)
    raw.py                 the protocols, each reading its requests and writing its answers and
    multipart.py           errors in its own terms: raw body / base64 / JSON {"data"}; multipart
    kserve.py              forms (also those the proxy passes on unparsed); KServe v1
    v2.py                  {"instances"}; the Open Inference Protocol (JSON and binary tensor
                           data, and the model's metadata)
    budget.py              admit: what a batch may cost here (timed at start), which requests fit
    images.py, deadline.py decode: header checks, decoding by the spec within a CPU-time
                           deadline, the transform
    runtimes.py            which forward runs: every candidate checked and timed on the serving CPU
    forwards.py            the candidate forwards (ONNX Runtime fp32/int8, bf16 with an fp32 head),
                           their check against fp32, the CPU's kernel flags (build tools share it)
    predict.py             forward: the forward passes and explanations of a batch
and beneath them:
    spec.py                the model spec: name, classes, architecture, input size and channels,
                           resize policy, mean/std; saved with the checkpoint, read by every layer
    net.py                 the CIFAR-10 net, the architecture registry that builds any spec's
                           net, TTA, checkpoints and class names (training imports it too)
    bodies.py              the Row a request travels in; JSON and base64 read within the limits
    answers.py             TorchServe's answer shapes (top classes, the error object)
    ranking.py             the one order of classes every route answers in (ties by class index),
                           the top-1 confidence and its margin, the confidence histogram's buckets
    errors.py              Failure (status, message, what is accepted) and the client's 4xx
    settings.py            model-config.yaml `handler:`, checked at worker start

Build-time code (ONNX export, quantization, the golden set) is in export_onnx.py, outside the .mar.
"""
