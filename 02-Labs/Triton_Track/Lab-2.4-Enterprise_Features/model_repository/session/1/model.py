"""A conversation's running token count, kept by the model per correlation id (sequence batcher).

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json
import time

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


def control(request, name):
    return int(from_dlpack(pb_utils.get_input_tensor_by_name(request, name).to_dlpack()).reshape(-1)[0])


def tensor(name, value, dtype):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(torch.tensor([[value]], dtype=dtype)))


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])
        self.idle_seconds = float(params.get("idle_seconds", "2"))
        self.sessions = {}  # correlation id -> {"tokens": int, "turn": int, "seen": monotonic time}

    def execute(self, requests):
        now = time.monotonic()
        for corrid in [c for c, s in self.sessions.items() if now - s["seen"] > self.idle_seconds]:
            del self.sessions[corrid]  # Triton dropped this sequence; nobody will END it
        responses = []
        for request in requests:
            try:
                corrid = control(request, "CORRID")
                if control(request, "START"):
                    self.sessions[corrid] = {"tokens": 0, "turn": 0, "seen": now}
                session = self.sessions.get(corrid)
                if session is None:  # Triton refuses this case first; kept for a model without its batcher
                    raise ValueError(f"no conversation {corrid}: start it with sequence_start=True")
                data = from_dlpack(pb_utils.get_input_tensor_by_name(request, "TEXT").to_dlpack())
                text = bytes(data.reshape(-1).tolist()).decode("utf-8")
                session["tokens"] += len(self.tokenizer(text)["input_ids"])
                session["turn"] += 1
                session["seen"] = now
                out = [tensor("TOTAL_TOKENS", session["tokens"], torch.int64), tensor("TURN", session["turn"], torch.int32)]
                if control(request, "END"):
                    del self.sessions[corrid]
                out.append(tensor("SESSIONS", len(self.sessions), torch.int32))
                responses.append(pb_utils.InferenceResponse(out))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"session: {exc}")))
        return responses
