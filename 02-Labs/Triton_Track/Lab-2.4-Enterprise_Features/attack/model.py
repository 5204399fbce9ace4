"""Notebook 03: why a production Triton server runs with --model-control-mode=none.

This file is not part of any model repository. The notebook sends its bytes to the server in a repository
API request (`load_model(..., files={"file:1/model.py": ...})`): in explicit mode Triton writes them into a
temporary model folder and runs them, so anyone who can reach that API runs code on the server, as the
server's user. Harmless here: initialize() writes one line saying who ran it into the file the config names.
"""
import json
import os

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        with open(params["proof_file"], "w") as f:
            f.write(f"code sent by a client ran inside the server: pid {os.getpid()}, uid {os.getuid()}\n")

    def execute(self, requests):
        return [pb_utils.InferenceResponse(error=pb_utils.TritonError("this model does nothing")) for _ in requests]
