"""Triton Python-backend model: the lab's CNN as ONNX (model.onnx), run by ONNX Runtime.

The same file is what NVIDIA's onnxruntime backend loads without Python (native_onnxruntime).
"providers" (config.pbtxt) lists the execution providers in order of preference; ONNX Runtime falls
back to the CPU silently when a provider cannot start, so initialize() refuses to load when the first
one asked for is not the one in use. "graph_optimization_level" (disabled, basic, extended, all) is
ONNX Runtime's SessionOptions.graph_optimization_level; "model_file" picks the graph (notebook 02 serves
the int8 graph, model_int8.onnx, from a copy of this model). Tensors cross the backend boundary through DLPack (torch), and
reach ONNX Runtime as numpy views of the same memory.
"""
import hashlib
import json
import os

import onnxruntime as ort
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


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
        providers = [p.strip() for p in params.get("providers", "CPUExecutionProvider").split(",") if p.strip()]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("cpu_threads", "1"))
        options.inter_op_num_threads = 1
        level = params.get("graph_optimization_level", "all")
        if level not in LEVELS:
            raise pb_utils.TritonModelException(f"graph_optimization_level {level!r}: expected one of {sorted(LEVELS)}")
        options.graph_optimization_level = LEVELS[level]
        path = os.path.join(args["model_repository"], args["model_version"], params.get("model_file", "model.onnx"))
        check_sha256(path, params.get("sha256", "none"))
        self.session = ort.InferenceSession(path, options, providers=providers)
        in_use = self.session.get_providers()
        if in_use[0] != providers[0]:
            raise pb_utils.TritonModelException(
                f"ONNX Runtime runs {in_use[0]}, not {providers[0]} (available: {ort.get_available_providers()})")

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack()) for r in requests]
        sizes = [x.shape[0] for x in inputs]
        batch = torch.cat(inputs).numpy()
        logits = torch.from_numpy(self.session.run(["OUTPUT__0"], {"INPUT__0": batch})[0])
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(part.contiguous()))])
                for part in torch.split(logits, sizes)]
