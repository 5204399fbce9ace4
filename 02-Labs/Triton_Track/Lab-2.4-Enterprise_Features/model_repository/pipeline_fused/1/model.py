"""The text pipeline fused into one Python model: the same tokenize, greedy steps (each recomputing the whole
sequence, like lm_step) and detokenize as pipeline_bls, with no hop between models.

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """TEXT, MAX_TOKENS -> OUTPUT_TEXT, STEPS."""

    def initialize(self, args):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if int(params.get("threads", "0")) > 0:
            torch.set_num_threads(int(params["threads"]))
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        dtype = getattr(torch, params.get("dtype", "float32"))
        self.tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])
        self.model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.default_max_tokens = int(params.get("max_tokens", "16"))

    @torch.inference_mode()
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
                max_tokens = (int(from_dlpack(limit.to_dlpack()).reshape(-1)[0]) if limit is not None
                              else self.default_max_tokens)
                if max_tokens < 1:
                    raise ValueError(f"MAX_TOKENS is {max_tokens}: ask for at least 1 token")
                data = from_dlpack(pb_utils.get_input_tensor_by_name(request, "TEXT").to_dlpack())
                text = bytes(data.reshape(-1).tolist()).decode("utf-8")
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                         add_generation_prompt=True, tokenize=True)
                if not isinstance(ids, list):
                    ids = ids["input_ids"]
                sequence = torch.tensor([ids], dtype=torch.int64, device=self.device)
                new = []
                while len(new) < max_tokens:
                    token = int(self.model(input_ids=sequence).logits[0, -1].float().argmax())
                    new.append(token)
                    if token in self.eos:
                        break
                    sequence = torch.cat([sequence, torch.tensor([[token]], device=self.device)], dim=1)
                out = torch.tensor(list(self.tokenizer.decode(new, skip_special_tokens=True).encode("utf-8")),
                                   dtype=torch.uint8)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack("OUTPUT_TEXT", to_dlpack(out)),
                    pb_utils.Tensor.from_dlpack("STEPS", to_dlpack(torch.tensor([len(new)], dtype=torch.int32))),
                ]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"pipeline_fused: {exc}")))
        return responses
