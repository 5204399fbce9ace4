"""Step 1 of the text pipeline: TEXT (UTF-8 bytes, UINT8) -> INPUT_IDS (INT64).

Tensors cross the backend boundary through DLPack (torch): the Python backend of tritonserver 2.51 mis-sizes
numpy 2 arrays given to ``pb_utils.Tensor`` and crashes on BYTES inputs, which is also why text is UINT8 here.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


def read_text(request, name):
    """A UINT8 tensor of UTF-8 bytes -> str (an invalid byte sequence raises)."""
    data = from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack())
    return bytes(data.reshape(-1).tolist()).decode("utf-8")


class TritonPythonModel:
    """The user's text wrapped in the model's chat template, then tokenized."""

    def initialize(self, args):
        from transformers import AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = read_text(request, "TEXT")
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                    ids = ids["input_ids"]
                out = torch.tensor(ids, dtype=torch.int64)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("INPUT_IDS", to_dlpack(out))]))
            except Exception as exc:  # the client sees the reason; the other requests are answered
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenize: {exc}")))
        return responses
