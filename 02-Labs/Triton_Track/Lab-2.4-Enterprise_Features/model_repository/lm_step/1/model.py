"""Step 2 of the text pipeline: one greedy step of the causal LM (no state kept between calls).

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """INPUT_IDS -> NEXT_ID, CONFIDENCE (the softmax probability of NEXT_ID)."""

    def initialize(self, args):
        from transformers import AutoModelForCausalLM

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if int(params.get("threads", "0")) > 0:  # 0: torch's default (one thread per core)
            torch.set_num_threads(int(params["threads"]))
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        dtype = getattr(torch, params.get("dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype=dtype).to(self.device).eval()

    @torch.inference_mode()
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = from_dlpack(pb_utils.get_input_tensor_by_name(request, "INPUT_IDS").to_dlpack())
                ids = ids.to(torch.int64).reshape(1, -1)
                if ids.shape[1] == 0:
                    raise ValueError("INPUT_IDS is empty: send at least one token id")
                logits = self.model(input_ids=ids.to(self.device)).logits[0, -1]
                confidence, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack("NEXT_ID", to_dlpack(token.reshape(1).to(torch.int64).cpu())),
                    pb_utils.Tensor.from_dlpack("CONFIDENCE", to_dlpack(confidence.reshape(1).cpu())),
                ]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"lm_step: {exc}")))
        return responses
