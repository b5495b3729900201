"""Serving a CIFAR-10 classifier with TorchServe: the package that handler/cifar10_handler.py (the class
TorchServe loads) works through, shipped inside the .mar beside it. One module per concern:

    spec.py      the model spec: name, classes, architecture, input size and channels, resize
                 policy, mean/std; saved with the checkpoint, read by every layer
    net.py       the CIFAR-10 net, the architecture registry that builds any spec's net, TTA,
                 checkpoints and class names (training imports it too)
    images.py    where a request's bytes become a tensor: header checks, decoding by the spec,
                 the transform
    requests.py  request bodies -> rows (raw, multipart, JSON base64, v2, KServe v1)
    forms.py     multipart bodies the reverse proxy passes on unparsed -> form fields
    oip.py       the Open Inference Protocol (v2): binary tensor data in requests
    oip_reply.py v2 answers: the outputs asked, as JSON or binary data
    budget.py    what a batch may cost here (timed at start), and which requests fit in it
    deadline.py  the CPU-time deadline that bounds decoding
    runtimes.py  which forward runs: every candidate checked and timed on the serving CPU
    predict.py   the forward passes and explanations of a batch
    answers.py   rows -> answers in each request's shape; errors per request
    errors.py    the client's 4xx and its message
    settings.py  model-config.yaml `handler:`, checked at worker start
    compat.py    the patches of TorchServe's worker (the only module that changes anything on import)

Build-time code (ONNX export, quantization, the golden set) is in export_onnx.py, outside the .mar.
"""
