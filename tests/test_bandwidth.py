"""inference_course.bandwidth: the copy-rate measurement on this machine and the weight-read verdicts."""
import pytest

from inference_course.bandwidth import BOUND_MAX, OVERHEAD_MIN, copy_bandwidth, weight_read_check


def test_copy_bandwidth_measures_this_machine_and_grows_with_a_faster_copy():
    big = copy_bandwidth("cpu", nbytes=64 << 20, repeats=3)
    # any machine that runs this course moves more than 100 MB/s and less than 10 TB/s through RAM
    assert 1e8 < big < 1e13, big
    # a buffer that fits in the CPU's cache copies faster than one that does not: the measurement is a
    # real timing of the bytes, not a constant
    small = copy_bandwidth("cpu", nbytes=64 << 10, repeats=50)
    assert small > big, (small, big)


def test_copy_bandwidth_refuses_a_missing_gpu_and_bad_sizes():
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            copy_bandwidth("cuda")
    with pytest.raises(ValueError, match="repeats"):
        copy_bandwidth("cpu", nbytes=1024, repeats=0)


@pytest.mark.parametrize("ratio, verdict", [
    (0.5, "faster than the copy rate"), (1.0, "bandwidth-bound"), (BOUND_MAX, "bandwidth-bound"),
    (BOUND_MAX + 0.01, "in between"), (OVERHEAD_MIN - 0.01, "in between"), (OVERHEAD_MIN, "overhead-bound"),
    (100.0, "overhead-bound"),
])
def test_weight_read_check_verdict_follows_the_ratio(ratio, verdict):
    weight, bw = 2e9, 4e12  # 2 GB at 4 TB/s: 0.5 ms per read
    check = weight_read_check(weight, ratio * 0.5e-3, bw, "test")
    assert check["ratio"] == pytest.approx(ratio)
    assert check["read_s"] == pytest.approx(0.5e-3)
    assert check["verdict"] == verdict
    assert f"{ratio:.2f}x one weight read" in check["text"]
    if verdict == "in between":  # the weight read's share is printed, not called "sizeable"
        assert f"reading the weights is {1 / ratio:.0%} of each step" in check["text"]
    if verdict in ("faster than the copy rate", "bandwidth-bound"):  # the advice says when it holds
        assert "if the kernels read them in that small form" in check["text"]


def test_weight_read_check_refuses_non_positive_numbers():
    with pytest.raises(ValueError, match="positive"):
        weight_read_check(1e9, 0.0, 1e12, "a token that took no time")


def test_weight_bytes_of_the_embedded_model_config():
    from inference_course.bandwidth import weight_bytes
    from inference_course.models import parameter_count

    config = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}  # SmolLM2-135M
    n = parameter_count(config)
    assert 134e6 < n < 136e6, n
    assert weight_bytes(config, "bfloat16") == 2 * n
    assert weight_bytes(config, "torch.float32") == 4 * n
    with pytest.raises(ValueError, match="unknown dtype"):
        weight_bytes(config, "int3")
