import json
import os
import random
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """An MLP whose weights (weights.npz) and behaviour (behavior.json) live in the version folder.

    behavior.json can make a version deliberately bad: ``error_rate`` (fraction of requests that
    fail) and ``delay_ms`` (extra time per execution). numpy only (a stub that imports torch takes
    seconds to start); tensors still cross through DLPack (np.from_dlpack / Tensor.from_dlpack)."""

    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        weights = np.load(os.path.join(folder, "weights.npz"))
        self.layers = [(weights[f"W{i}"], weights[f"b{i}"]) for i in range(len(weights.files) // 2)]
        path = os.path.join(folder, "behavior.json")
        self.behavior = json.load(open(path)) if os.path.exists(path) else {}
        self.rng = random.Random(int(args["model_version"]))

    def execute(self, requests):
        delay = self.behavior.get("delay_ms", 0) / 1000
        if delay:
            time.sleep(delay)
        responses = []
        for request in requests:
            if self.rng.random() < self.behavior.get("error_rate", 0):
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("injected failure")))
                continue
            x = np.from_dlpack(pb_utils.get_input_tensor_by_name(request, "FEATURES")).astype(np.float32)
            for i, (W, b) in enumerate(self.layers):
                x = x @ W + b
                if i < len(self.layers) - 1:
                    x = np.maximum(x, 0)
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            probs = np.ascontiguousarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("PROBS", probs)]))
        return responses
