import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """Token-by-token generation with transformers; one response per new token (decoupled mode)."""

    def initialize(self, args):
        from transformers import AutoModelForCausalLM

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        dtype = getattr(torch, params.get("dtype", "float32"))
        self.model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype=dtype).to(self.device).eval()
        self.temperature = float(params.get("temperature", "0"))
        self.default_max_tokens = int(params.get("max_tokens", "32"))
        self.eos = self.model.generation_config.eos_token_id
        self.eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
        self.generator = torch.Generator(device=self.device).manual_seed(int(params.get("seed", "0")))

    def _tensor(self, request, name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else from_dlpack(t.to_dlpack())

    @torch.inference_mode()
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                ids = self._tensor(request, "INPUT_IDS").to(torch.int64).reshape(1, -1).to(self.device)
                limit = self._tensor(request, "MAX_TOKENS")
                max_tokens = int(limit.reshape(-1)[0]) if limit is not None else self.default_max_tokens
                past, step_input = None, ids
                for _ in range(max_tokens):
                    out = self.model(input_ids=step_input, past_key_values=past, use_cache=True)
                    past, logits = out.past_key_values, out.logits[0, -1].float()
                    if self.temperature > 0:
                        probs = torch.softmax(logits / self.temperature, dim=-1)
                        token = torch.multinomial(probs, 1, generator=self.generator)
                    else:
                        token = logits.argmax().reshape(1)
                    token = token.to(torch.int64).cpu().contiguous()
                    sender.send(pb_utils.InferenceResponse(
                        [pb_utils.Tensor.from_dlpack("TOKEN_ID", to_dlpack(token))]))
                    if int(token[0]) in self.eos:
                        break
                    step_input = token.reshape(1, 1).to(self.device)
                sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client sees the reason, the stream is closed
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
