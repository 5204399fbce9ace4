"""Triton Python-backend model: the lab's CNN run by OpenVINO on the CPU.

OpenVINO reads the ONNX file (model.onnx) directly and compiles it for the CPU with the precision and
thread count from config.pbtxt ("precision_hint", "cpu_threads"). NVIDIA's openvino backend would load
the IR (model.xml + model.bin) instead (native_openvino). Tensors cross the backend boundary through
DLPack (torch); OpenVINO's result is copied out of its request buffer before it is returned.
"""
import hashlib
import json
import os

import numpy as np
import openvino as ov
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
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
        check_sha256(path, params.get("sha256", "none"))
        properties = {"INFERENCE_NUM_THREADS": int(params.get("cpu_threads", "1"))}
        hint = params.get("precision_hint", "f32")
        if hint != "default":  # "default": leave OpenVINO's own choice for this CPU (bf16 where it has bf16 instructions)
            properties["INFERENCE_PRECISION_HINT"] = hint
        self.compiled = ov.Core().compile_model(path, "CPU", properties)

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack()) for r in requests]
        sizes = [x.shape[0] for x in inputs]
        result = self.compiled(torch.cat(inputs).numpy())[0]
        logits = torch.from_numpy(np.array(result, dtype=np.float32, copy=True))
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(part.contiguous()))])
                for part in torch.split(logits, sizes)]
