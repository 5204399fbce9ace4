"""Triton Python-backend model: the lab's MLP, one forward pass per batch of requests.

Triton calls execute() with every request its scheduler collected (more than one only with dynamic
batching). The inputs are concatenated along the batch axis, run through the model once and split back
into one response per request. Tensors cross the backend boundary through DLPack (the bundled backend
mis-sizes numpy 2 arrays; DLPack works with numpy 1 and 2).

The sizes come from config.pbtxt's parameters; the weights from weights.pt beside this file (written by
the notebook), else from torch.manual_seed(seed) as triton_basics_helpers.make_mlp builds them.
"""
import json
import os

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


def build_mlp(in_features: int, hidden: int, out_features: int):
    """A three-layer MLP classifier (logits out); model_repository/mlp/1/model.py holds the same function."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(in_features, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, out_features),
    )


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        if args["model_instance_kind"] == "GPU":
            self.device = torch.device("cuda", int(args["model_instance_device_id"]))
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(int(params.get("cpu_threads", "1")))
        weights = f"{args['model_repository']}/{args['model_version']}/weights.pt"
        if not os.path.exists(weights):
            torch.manual_seed(int(params.get("seed", "0")))
        self.model = build_mlp(int(params["in_features"]), int(params["hidden"]), int(params["out_features"]))
        if os.path.exists(weights):
            self.model.load_state_dict(torch.load(weights, map_location="cpu"))
        self.model = self.model.eval().to(self.device)

    def execute(self, requests):
        inputs = [from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT__0").to_dlpack()) for r in requests]
        sizes = [x.shape[0] for x in inputs]
        batch = torch.cat(inputs).to(self.device)
        with torch.inference_mode():
            logits = self.model(batch).cpu()
        responses = []
        for part in torch.split(logits, sizes):
            out = pb_utils.Tensor.from_dlpack("OUTPUT__0", to_dlpack(part.contiguous()))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
