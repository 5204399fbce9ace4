"""Triton Python-backend model: the lab's CNN in PyTorch eager mode, one forward pass per batch.

Tensors cross the backend boundary through DLPack (the bundled backend mis-sizes numpy 2 arrays;
DLPack works with numpy 1 and 2). Sizes come from config.pbtxt's parameters; the weights from
weights.pt beside this file (written by the notebook), else from torch.manual_seed(seed) as
backend_integration_helpers.make_cnn builds them.
"""
import hashlib
import json
import os

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


def check_sha256(path, expected):
    """Refuse a file that is not the one config.pbtxt was written for ("none": not checked)."""
    if expected != "none":
        with open(path, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        if digest != expected:
            raise pb_utils.TritonModelException(f"{path}: sha256 {digest[:12]}..., config.pbtxt expects {expected[:12]}...")


def build_cnn(channels: int, num_classes: int = 10):
    """A small CNN for 1x28x28 images (logits out); model_repository/py_torch_eager/1/model.py holds the same function."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(channels, 2 * channels, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(2 * channels * 7 * 7, num_classes),
    )


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(int(params.get("cpu_threads", "1")))
        weights = os.path.join(args["model_repository"], args["model_version"], "weights.pt")
        torch.manual_seed(int(params.get("seed", "0")))
        self.model = build_cnn(int(params["channels"]), int(params.get("num_classes", "10")))
        if os.path.exists(weights):
            check_sha256(weights, params.get("sha256", "none"))
            self.model.load_state_dict(torch.load(weights, map_location="cpu"))
        self.model = self.model.eval().to(self.device)

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack()) for r in requests]
        sizes = [x.shape[0] for x in inputs]
        with torch.inference_mode():
            logits = self.model(torch.cat(inputs).to(self.device)).cpu()
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(part.contiguous()))])
                for part in torch.split(logits, sizes)]
