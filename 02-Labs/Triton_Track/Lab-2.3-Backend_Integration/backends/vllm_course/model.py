"""The course's vLLM backend for Triton: a *Python-based backend* (Triton Lab 2.3, notebook 03).

A model whose config.pbtxt says ``backend: "vllm_course"`` is served by this file: Triton finds
``<backend-directory>/vllm_course/model.py`` and runs it in the Python backend's stub process, as it does
NVIDIA's own vLLM backend (github.com/triton-inference-server/vllm_backend, which this follows in shape
but not in code). What it does, part by part:

1. ``auto_complete_config``: the backend, not each model, decides the inputs, outputs and the decoupled
   transaction policy, so a model folder only names the backend and gives its engine's settings.
2. ``initialize``: one vLLM ``AsyncLLM`` (the engine ``vllm serve`` runs) per model instance, on an asyncio
   event loop in a thread of its own. The engine core runs in a process vLLM spawns, as under ``vllm serve``.
3. ``execute``: Triton hands over a batch of requests and gets nothing back; each request becomes a
   coroutine on the loop, which streams the generated tokens through the request's response sender
   (decoupled mode): one response per engine output, that is one token per step while the sends keep up and
   several once they lag, and ends with the FINAL flag. Triton's dynamic batcher has nothing to
   do: vLLM's own scheduler batches every request in flight (continuous batching).
4. ``finalize``: the engine is shut down and the loop stopped when Triton unloads the model.

Token ids in and out (INT64), not text (BYTES): the Python backend of tritonserver 2.51 (the course's) cannot
read a BYTES input under numpy 2, which vLLM needs (python_backend PR #384 fixed it after 2.51); the
client tokenizes with the model's own tokenizer, as it would for any token-level API. For the same reason
tensors cross the stub through DLPack (torch), not numpy: under numpy 2 a ``pb_utils.Tensor`` made from a
numpy array reached the client empty on this server (tried here: "cannot reshape array of size 0").
"""
import asyncio
import json
import locale
import threading
import uuid

# The stub starts its interpreter in the C locale; torch and vLLM read text files with the locale's encoding
# at import (ASCII there: UnicodeDecodeError). UTF-8 before anything imports them.
try:
    locale.setlocale(locale.LC_CTYPE, "C.UTF-8")
except locale.Error:
    pass

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

INPUTS = [
    {"name": "INPUT_IDS", "data_type": "TYPE_INT64", "dims": [-1]},
    {"name": "MAX_TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": True},
    {"name": "TEMPERATURE", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    {"name": "IGNORE_EOS", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
]
OUTPUTS = [{"name": "TOKEN_ID", "data_type": "TYPE_INT64", "dims": [-1]}]


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        declared_in = {i["name"] for i in auto_complete_model_config.as_dict().get("input", [])}
        declared_out = {o["name"] for o in auto_complete_model_config.as_dict().get("output", [])}
        for spec in INPUTS:
            if spec["name"] not in declared_in:
                auto_complete_model_config.add_input(spec)
        for spec in OUTPUTS:
            if spec["name"] not in declared_out:
                auto_complete_model_config.add_output(spec)
        auto_complete_model_config.set_max_batch_size(0)
        auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
        return auto_complete_model_config

    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                "vllm_course streams its tokens as they are made: set model_transaction_policy { decoupled: true }")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if "model_dir" not in params:
            raise pb_utils.TritonModelException('vllm_course needs a parameter "model_dir" (a model folder)')
        engine_args = json.loads(params.get("engine_args", "{}"))
        self.default_max_tokens = int(params.get("max_tokens", "32"))
        self.logger = pb_utils.Logger

        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM

        self._sampling = SamplingParams
        self._delta = RequestOutputKind.DELTA
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="vllm_course-loop", daemon=True)
        self.thread.start()

        async def create():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(model=params["model_dir"], **engine_args))

        # Created on the loop: the engine's output handler is a task of the loop it first runs on.
        self.engine = asyncio.run_coroutine_threadsafe(create(), self.loop).result()
        self.in_flight = 0
        self.lock = threading.Lock()
        self.logger.log_info(f"vllm_course: {params['model_dir']} loaded with {engine_args}")

    def execute(self, requests):
        for request in requests:
            with self.lock:
                self.in_flight += 1
            asyncio.run_coroutine_threadsafe(self._generate(request), self.loop)
        return None  # decoupled: every response goes through the request's sender

    def _input(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else from_dlpack(tensor.to_dlpack()).reshape(-1).tolist()

    async def _generate(self, request):
        sender = request.get_response_sender()
        request_id = uuid.uuid4().hex
        try:
            ids = self._input(request, "INPUT_IDS")
            if not ids:
                raise ValueError("INPUT_IDS is empty: send the prompt's token ids")
            max_tokens = self._input(request, "MAX_TOKENS")
            temperature = self._input(request, "TEMPERATURE")
            ignore_eos = self._input(request, "IGNORE_EOS")
            params = self._sampling(
                max_tokens=int(max_tokens[0]) if max_tokens is not None else self.default_max_tokens,
                temperature=float(temperature[0]) if temperature is not None else 0.0,
                ignore_eos=bool(ignore_eos[0]) if ignore_eos is not None else False,
                output_kind=self._delta)
            prompt = {"prompt_token_ids": [int(i) for i in ids]}
            async for output in self.engine.generate(prompt, params, request_id):
                if request.is_cancelled():  # the client went away: free the engine's slot at once
                    await self.engine.abort(request_id)
                    break
                # Every token the engine made since this request's last response, in one response: one token
                # per engine step while the sends keep up; when they fall behind (each send is a blocking hop
                # to the server through shared memory), vLLM merges the deltas, and one send carries several.
                tokens = output.outputs[0].token_ids
                if tokens:
                    tensor = torch.tensor(list(tokens), dtype=torch.int64)
                    sender.send(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack("TOKEN_ID", to_dlpack(tensor))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # the engine request is freed; the client sees the reason and the stream is closed
            await self.engine.abort(request_id)
            try:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"vllm_course: {exc}")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as closed:  # noqa: BLE001 - the client left: nobody to tell
                self.logger.log_warn(f"vllm_course: request {request_id} failed ({exc}); its sender is gone ({closed})")
        finally:
            with self.lock:
                self.in_flight -= 1

    def finalize(self):
        self.logger.log_info(f"vllm_course: unloading ({self.in_flight} request(s) in flight)")
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
