"""Run an ONNX file on a batch with ONNX Runtime (one thread) and save the logits; numpy and
onnxruntime only, so that it starts within seconds under an emulated CPU:

    qemu-x86_64 -cpu Haswell .venv/bin/python tests/onnx_logits.py MODEL IN.npy OUT.npy
"""
import sys

import numpy as np
import onnxruntime

model, images, out = sys.argv[1:4]
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = 1
session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
np.save(out, session.run(None, {"images": np.load(images)})[0])
