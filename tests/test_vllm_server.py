"""`vllm serve` through the managed-server module: a real OpenAI-compatible server on the course model."""
import os

import psutil
import pytest

from inference_course import servers
from inference_course.models import resolve_model
from inference_course.profiles import get_profile


@pytest.fixture(scope="module")
def served():
    """One real `vllm serve` of the course model for this module's tests (an engine start costs half a
    minute on the CI machine); after the last of them it must stop completely."""
    # the profile's serving settings: on cpu a fixed 1 GiB KV cache, allocated seconds faster than an
    # auto-sized one; the loads here need far less
    server = servers.vllm_server(resolve_model(), served_name="course-model", **get_profile().serving_engine_kwargs())
    with server:
        pgid = server.pid
        yield server
    assert not server.running()
    assert servers.group_members(pgid) == [], "vLLM engine processes outlived the server's stop()"


@pytest.mark.engine
def test_vllm_serve_answers_openai_clients(served):
    """That the server then stops completely is checked by the `served` fixture after the module's tests."""
    import openai

    server = served
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
    assert server.cmd[server.cmd.index("--dtype") + 1] == get_profile().vllm_dtype
    # The profile's engine environment took effect: on cpu (VLLM_ENABLE_V1_MULTIPROCESSING=0) the model
    # runs in the EngineCore process, with no worker process beside it.
    names = [" ".join(p.cmdline()) for p in psutil.Process(server.pid).children(recursive=True)]
    assert any("EngineCore" in n for n in names), names
    expect_worker = dict(get_profile().vllm_env).get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"
    if get_profile().device == "cpu":
        assert any("Worker" in n for n in names) == expect_worker, names


@pytest.mark.engine
def test_course_driver_agrees_with_vllm_bench_serve_on_a_real_server(served):
    from test_bench_agreement import check_tools_agree

    check_tools_agree(served, resolve_model(), "course-model")


def test_the_profile_engine_environment_reaches_vllm_serve_and_an_explicit_env_overrides_it():
    profile = get_profile()
    plain = servers.vllm_server("some/model", port=1)
    for name, value in profile.vllm_env:
        assert plain.env[name] == value
    pinned = servers.vllm_server("some/model", port=1, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    assert pinned.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    gateway = servers.service_server("some/model", upstream="http://127.0.0.1:1", port=1)
    assert not set(dict(profile.vllm_env)) & set(gateway.env), "a gateway starts no engine"


def test_the_service_profile_engine_flag_applies_the_profile_engine_environment(monkeypatch):
    """The container's entrypoint passes --profile-engine: the service inside it must run the engine the way
    servers.service_server runs it on the host, or the lab compares two different engines."""
    from inference_course.service.__main__ import config_from_args, parse_args

    profile = get_profile()
    for name, _ in profile.vllm_env:
        monkeypatch.delenv(name, raising=False)
    config = config_from_args(parse_args(["--model", "m", "--profile-engine"]))
    assert config.engine_kwargs["dtype"] == profile.vllm_dtype
    for name, value in profile.vllm_env:
        assert os.environ[name] == value
    host = servers.service_server("m", port=1)
    assert all(host.env[name] == value for name, value in profile.vllm_env)
