"""The text pipeline as Business Logic Scripting: this model calls tokenize, lm_step and detokenize through
Triton, in a loop whose length depends on the data (one lm_step per new token, until the end-of-sequence
token or MAX_TOKENS).

Tensors cross the backend boundary through DLPack (torch): see tokenize/1/model.py.
"""
import json

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack
import triton_python_backend_utils as pb_utils


def tensor(name, value):
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def call(model, inputs, outputs, parent):
    """One BLS call: a request to another model of this server, run to completion (``exec`` blocks).
    ``trace=parent.trace()`` makes it a child span of the caller's trace (notebook 03)."""
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs,
                                        trace=parent.trace())
    response = request.exec()
    if response.has_error():
        raise pb_utils.TritonModelException(response.error().message())  # it names the model that failed
    return [from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack()) for name in outputs]


class TritonPythonModel:
    """TEXT, MAX_TOKENS -> OUTPUT_TEXT, STEPS: tokenize once, lm_step until end of sequence, detokenize once."""

    def initialize(self, args):
        from transformers import GenerationConfig

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        eos = GenerationConfig.from_pretrained(params["model_dir"]).eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.default_max_tokens = int(params.get("max_tokens", "16"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                limit = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
                max_tokens = (int(from_dlpack(limit.to_dlpack()).reshape(-1)[0]) if limit is not None
                              else self.default_max_tokens)
                if max_tokens < 1:
                    raise ValueError(f"MAX_TOKENS is {max_tokens}: ask for at least 1 token")
                text = from_dlpack(pb_utils.get_input_tensor_by_name(request, "TEXT").to_dlpack())
                (sequence,) = call("tokenize", [tensor("TEXT", text)], ["INPUT_IDS"], request)
                new = []
                while len(new) < max_tokens:  # the data-dependent loop an ensemble cannot express
                    (next_id,) = call("lm_step", [tensor("INPUT_IDS", sequence)], ["NEXT_ID"], request)
                    token = int(next_id.reshape(-1)[0])
                    new.append(token)
                    if token in self.eos:
                        break
                    sequence = torch.cat([sequence.reshape(-1), next_id.reshape(-1).to(torch.int64)])
                (out,) = call("detokenize", [tensor("TOKEN_IDS", torch.tensor(new, dtype=torch.int64))], ["TEXT"],
                              request)
                responses.append(pb_utils.InferenceResponse([
                    tensor("OUTPUT_TEXT", out), tensor("STEPS", torch.tensor([len(new)], dtype=torch.int32))]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"pipeline_bls: {exc}")))
        return responses
