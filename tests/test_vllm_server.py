"""`vllm serve` through the managed-server module: a real OpenAI-compatible server on the course model."""
import pytest

from inference_course import servers
from inference_course.models import resolve_model
from inference_course.profiles import get_profile


@pytest.mark.engine
def test_vllm_serve_answers_openai_clients_and_stops_completely():
    import openai

    server = servers.vllm_server(resolve_model(), served_name="course-model")
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["course-model"]
        chat = client.chat.completions.create(
            model="course-model", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        stream = client.completions.create(model="course-model", prompt="One, two, three,", max_tokens=8,
                                           temperature=0, stream=True)
        chunks = [c.choices[0].text for c in stream if c.choices]
        assert len(chunks) > 1, "streaming returned a single chunk"
        pgid = server.pid
        assert server.cmd[server.cmd.index("--dtype") + 1] == get_profile().vllm_dtype
    assert servers.group_members(pgid) == [], "vLLM engine processes outlived the server's stop()"
