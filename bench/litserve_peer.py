"""LitServe serving the same checkpoint, the peer `make bench BENCH_PEER=litserve` measures beside
TorchServe: eager torch, no TTA, LitServe's dynamic batching (up to 32 requests, 1 ms), one torch
thread in each of 2 workers, JSON {"data": "<base64>"} bodies decoded by this project's decoder.

    .venv/bin/python -m pip install -r bench/requirements-peer.txt
    .venv/bin/python -m bench.litserve_peer --weights weights/cifar10.pt --port 8095
"""
import argparse
import base64

import litserve as ls
import torch

from cifar10_serve.images import decode_image, eval_transform, image_tensor
from cifar10_serve.net import build_net, load_checkpoint
from cifar10_serve.spec import from_checkpoint


class Cifar10API(ls.LitAPI):
    def __init__(self, weights, **kwargs):
        super().__init__(**kwargs)
        self.weights = weights

    def setup(self, device):
        torch.set_num_threads(1)
        checkpoint = load_checkpoint(self.weights)
        self.spec = from_checkpoint(checkpoint)
        self.net = build_net(self.spec, checkpoint["state_dict"])
        self.net = self.net.to(memory_format=torch.channels_last).eval()
        self.classes = self.spec.classes
        self.transform = eval_transform(self.spec)

    def decode_request(self, request):
        return image_tensor(decode_image(base64.b64decode(request["data"]), self.spec))

    def batch(self, inputs):
        return torch.stack(inputs)

    @torch.inference_mode()
    def predict(self, x):
        logits = self.net(self.transform(x).contiguous(memory_format=torch.channels_last))
        return (logits / self.spec.temperature).softmax(1)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        values, indices = probs.topk(5)
        return {self.classes[i]: p for i, p in zip(indices.tolist(), values.tolist())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="checkpoint written by train.py")
    p.add_argument("--port", type=int, default=8095, help="port on 127.0.0.1 (default: 8095)")
    p.add_argument("--workers", type=int, default=2, help="LitServe workers (default: 2)")
    args = p.parse_args(argv)
    api = Cifar10API(args.weights, max_batch_size=32, batch_timeout=0.001)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers, timeout=30)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
