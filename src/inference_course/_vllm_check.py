"""One greedy vLLM generation on the course model; prints a JSON line. Run by the doctor in a subprocess
(``python -m inference_course._vllm_check``) so that a crash or hang cannot take the doctor down."""
from __future__ import annotations

import json
import sys
import time

QUESTION = "What is the capital of France?"
MARKER = "VLLM_CHECK_RESULT "


def parse(stdout: str) -> dict | None:
    """The result line this module printed, from the subprocess's stdout (engine logs around it)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return None


def main() -> int:
    from .models import resolve_model
    from .profiles import get_profile

    profile = get_profile()
    profile.apply_vllm_env()  # the engine the labs run (cpu: no worker process)
    model = resolve_model()
    started = time.monotonic()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **profile.vllm_engine_kwargs())
    ready = time.monotonic() - started
    t0 = time.monotonic()
    out = llm.chat([{"role": "user", "content": QUESTION}], SamplingParams(temperature=0.0, max_tokens=24))
    gen = time.monotonic() - t0
    completion = out[0].outputs[0]
    print(MARKER + json.dumps({"answer": completion.text, "tokens": len(completion.token_ids),
                      "engine_start_s": round(ready, 1), "generate_s": round(gen, 2)}))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
