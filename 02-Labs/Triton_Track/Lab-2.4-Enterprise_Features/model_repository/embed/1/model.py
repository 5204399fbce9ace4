"""TEXT (UTF-8 bytes, UINT8) -> EMBEDDING: the mean of the model's last hidden states over the text's tokens.

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoModel, AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if int(params.get("threads", "0")) > 0:
            torch.set_num_threads(int(params["threads"]))
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])
        dtype = getattr(torch, params.get("dtype", "float32"))
        self.model = AutoModel.from_pretrained(params["model_dir"], dtype=dtype).to(self.device).eval()
        self.calls = 0  # requests this instance computed (a cache hit never reaches it)

    @torch.inference_mode()
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                data = from_dlpack(pb_utils.get_input_tensor_by_name(request, "TEXT").to_dlpack())
                text = bytes(data.reshape(-1).tolist()).decode("utf-8")
                ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
                if ids.shape[1] == 0:
                    raise ValueError("TEXT has no tokens: send some text")
                hidden = self.model(input_ids=ids.to(self.device)).last_hidden_state[0]
                self.calls += 1
                out = hidden.float().mean(dim=0).cpu().contiguous()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("EMBEDDING", to_dlpack(out))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"embed: {exc}")))
        return responses
