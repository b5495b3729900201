"""Serving an image classifier with TorchServe: the package that handler/cifar10_handler.py (the
class TorchServe loads) works through, shipped inside the .mar beside it. A batch passes, in order:

    torchserve_adapter.py  detect each request's kind and protocol; answers back through the
                           context; the patches of TorchServe's worker (the only import effect)
    raw, multipart, kserve, v2  one module per protocol: its requests, answers and errors
    budget.py              admit: what a batch may cost here, which requests fit
    images.py, deadline.py decode by the spec within a CPU-time deadline; the transform
    runtimes.py, forwards.py  which forward runs, checked and timed on the serving CPU
    predict.py             forward: the forward passes and explanations of a batch
and beneath them spec.py (the model spec), net.py (architectures, TTA, checkpoints), bodies.py
(the Row; JSON and base64 within the limits), answers.py, ranking.py, errors.py, settings.py.
Build-time code (ONNX export, quantization, the golden set) is in export_onnx.py, outside the .mar.
"""
