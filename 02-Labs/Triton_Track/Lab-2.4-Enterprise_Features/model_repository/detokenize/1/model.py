"""Step 3 of the text pipeline: TOKEN_IDS (INT64) -> TEXT (UTF-8 bytes, UINT8), special tokens left out.

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = from_dlpack(pb_utils.get_input_tensor_by_name(request, "TOKEN_IDS").to_dlpack())
                text = self.tokenizer.decode(ids.reshape(-1).tolist(), skip_special_tokens=True)
                out = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("TEXT", to_dlpack(out))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"detokenize: {exc}")))
        return responses
