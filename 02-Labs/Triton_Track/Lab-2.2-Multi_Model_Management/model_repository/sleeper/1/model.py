import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Compute time set by the config: each execution sleeps base_ms + per_item_ms * rows in the batch.
    Sleeping (not computing) keeps the timing deterministic on a 2-core machine."""

    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.base = float(params["base_ms"]["string_value"]) / 1000
        self.per_item = float(params["per_item_ms"]["string_value"]) / 1000

    def execute(self, requests):
        xs = [np.from_dlpack(pb_utils.get_input_tensor_by_name(r, "INPUT")) for r in requests]
        rows = sum(int(x.shape[0]) for x in xs)
        time.sleep(self.base + self.per_item * rows)
        return [pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("OUTPUT", x.copy())])
                for x in xs]
