"""Triton Python-backend model: the lab's CNN as TorchScript (model.pt), loaded with torch.jit.load.

The same file is what NVIDIA's pytorch_libtorch backend loads without Python (native_libtorch).
Tensors cross the backend boundary through DLPack (works with numpy 1 and 2).
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


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(int(params.get("cpu_threads", "1")))
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.pt"))
        check_sha256(path, params.get("sha256", "none"))
        self.model = torch.jit.load(path, map_location=self.device).eval()

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack()) for r in requests]
        sizes = [x.shape[0] for x in inputs]
        with torch.inference_mode():
            logits = self.model(torch.cat(inputs).to(self.device)).cpu()
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(part.contiguous()))])
                for part in torch.split(logits, sizes)]
