"""Tests of Lab 2.2's from-scratch helpers: paged KV cache, speculative decoding, quantization.

The model tests load the embedded SmolLM2-135M once per module and keep inputs short: the whole
file is meant to run in about a minute on 2 CPU cores.
"""
import copy
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "02-Labs/vLLM_Track/Lab-2.2-Inference_Optimization"))

import inference_optimization_helpers as H  # noqa: E402


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    # On a 2-core runner that is busy with other jobs (a vLLM server, a notebook), PyTorch's two
    # OpenMP threads keep waiting for each other: a 50-token forward pass took 2.3 s with 2 threads
    # and 0.45 s with 1. One thread is also deterministic across runs. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_and_tokenizer(one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_course.models import resolve_model

    path = resolve_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def gpl_text():
    return H.offline_english_text(max_chars=2000)


@pytest.fixture(scope="module")
def fp32_perplexity(model_and_tokenizer, gpl_text):
    model, tokenizer = model_and_tokenizer
    return H.perplexity(model, tokenizer, gpl_text)


# ==================================================================================================
# Part 1 - paged KV cache
# ==================================================================================================

def test_kv_bytes_per_token_by_hand_and_from_config():
    # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64 -> 2 * 30 * 3 * 64 = 11,520 numbers per token.
    assert H.kv_bytes_per_token(30, 3, 64, 4) == 46_080
    assert H.kv_bytes_per_token(30, 3, 64, 2) == 23_040
    config = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "hidden_size": 576, "head_dim": 64}
    assert H.kv_bytes_per_token_from_config(config, 2) == 23_040
    # Without head_dim and num_key_value_heads: hidden / heads, and one KV head per query head.
    assert H.kv_bytes_per_token_from_config({"num_hidden_layers": 2, "num_attention_heads": 4,
                                             "hidden_size": 256}, 2) == 2 * 2 * 4 * 64 * 2
    # Llama-3.1-8B in bf16: 128 KiB per token.
    from inference_course.models import SHAPES

    assert H.kv_bytes_per_token_from_config(SHAPES["llama-3.1-8b"], 2) == 131_072


def test_kv_bytes_from_a_transformers_config():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=576, head_dim=64)
    assert H.kv_bytes_per_token_from_config(config, 4) == 46_080


def test_allocator_round_trip_and_refcounts():
    alloc = H.BlockAllocator(num_blocks=4, block_size=16)
    assert alloc.num_free == 4
    blocks = [alloc.allocate() for _ in range(3)]
    assert len(set(blocks)) == 3 and alloc.num_free == 1 and alloc.num_used == 3
    assert all(alloc.refcount(b) == 1 for b in blocks)
    alloc.incref(blocks[0])
    assert alloc.refcount(blocks[0]) == 2
    alloc.free(blocks[0])  # still used once: not back in the free list
    assert alloc.refcount(blocks[0]) == 1 and alloc.num_free == 1
    for b in blocks:
        alloc.free(b)
    assert alloc.num_free == 4 and all(alloc.refcount(b) == 0 for b in range(4))
    with pytest.raises(ValueError, match="free"):
        alloc.free(blocks[1])  # double free


def test_allocator_raises_out_of_blocks():
    alloc = H.BlockAllocator(num_blocks=2, block_size=4)
    alloc.allocate()
    alloc.allocate()
    with pytest.raises(H.OutOfBlocks, match="2 blocks"):
        alloc.allocate()


def test_append_allocates_blocks_only_when_needed():
    cache = H.PagedKVCache(num_blocks=10, block_size=4)
    cache.add_sequence("a")
    cache.append_tokens("a", 1)
    assert len(cache.block_table("a")) == 1 and cache.memory_waste("a") == 3
    cache.append_tokens("a", 3)  # fills the first block exactly
    assert len(cache.block_table("a")) == 1 and cache.memory_waste("a") == 0
    cache.append_tokens("a", 1)  # token 5 needs block 2
    assert len(cache.block_table("a")) == 2 and cache.num_tokens("a") == 5
    assert cache.used_blocks == 2 and cache.memory_waste() == 3
    cache.free_sequence("a")
    assert cache.used_blocks == 0 and cache.allocator.num_free == 10


def test_fork_shares_every_block():
    cache = H.PagedKVCache(num_blocks=10, block_size=4)
    cache.add_sequence("prompt")
    cache.append_tokens("prompt", 10)  # 3 blocks, the last one half full
    cache.fork("prompt", "sample1")
    assert cache.block_table("sample1") == cache.block_table("prompt")
    assert cache.num_tokens("sample1") == 10
    assert cache.used_blocks == 3  # nothing was copied
    assert all(cache.allocator.refcount(b) == 2 for b in cache.block_table("prompt"))
    assert cache.stats()["shared_blocks"] == 3


def test_copy_on_write_happens_once_on_a_shared_partial_block():
    cache = H.PagedKVCache(num_blocks=10, block_size=4)
    cache.add_sequence("p")
    cache.append_tokens("p", 6)  # blocks [b0 full, b1 with 2 of 4 slots]
    cache.fork("p", "c")
    shared_last = cache.block_table("p")[-1]
    cache.append_tokens("c", 1)  # writes into the shared, half-full b1 -> copy first
    assert cache.copy_on_write_events == 1
    assert cache.block_table("c")[0] == cache.block_table("p")[0]  # the full block stays shared
    assert cache.block_table("c")[-1] != shared_last
    assert cache.block_table("p")[-1] == shared_last and cache.allocator.refcount(shared_last) == 1
    cache.append_tokens("c", 1)  # the copy is private now: no second copy
    cache.append_tokens("p", 2)  # the parent's b1 is no longer shared either
    assert cache.copy_on_write_events == 1
    assert cache.num_tokens("c") == 8 and cache.num_tokens("p") == 8


def test_no_copy_on_write_when_the_shared_blocks_are_full():
    cache = H.PagedKVCache(num_blocks=10, block_size=4)
    cache.add_sequence("p")
    cache.append_tokens("p", 8)  # exactly two full blocks
    cache.fork("p", "c")
    cache.append_tokens("c", 3)  # goes into a brand-new block
    cache.append_tokens("p", 3)
    assert cache.copy_on_write_events == 0
    assert cache.block_table("c")[:2] == cache.block_table("p")[:2]
    assert cache.used_blocks == 4


def test_freeing_a_forked_parent_keeps_the_childs_blocks():
    cache = H.PagedKVCache(num_blocks=10, block_size=4)
    cache.add_sequence("p")
    cache.append_tokens("p", 7)
    cache.fork("p", "c")
    child_blocks = cache.block_table("c")
    cache.free_sequence("p")
    assert cache.block_table("c") == child_blocks
    assert all(cache.allocator.refcount(b) == 1 for b in child_blocks)
    assert cache.used_blocks == 2
    cache.append_tokens("c", 1)  # the last block is private now: no copy needed
    assert cache.copy_on_write_events == 0
    cache.free_sequence("c")
    assert cache.used_blocks == 0


def test_cache_out_of_blocks_changes_nothing():
    cache = H.PagedKVCache(num_blocks=3, block_size=4)
    cache.add_sequence("a")
    cache.append_tokens("a", 10)  # 3 blocks: the pool is full, 2 slots left in the last block
    assert not cache.can_append("a", 3)
    with pytest.raises(H.OutOfBlocks):
        cache.append_tokens("a", 3)
    assert cache.num_tokens("a") == 10 and cache.used_blocks == 3
    cache.append_tokens("a", 2)  # still fits in the last block
    # A fork of a sequence with a half-full last block needs one free block to copy on write.
    cache2 = H.PagedKVCache(num_blocks=2, block_size=4)
    cache2.add_sequence("p")
    cache2.append_tokens("p", 6)
    cache2.fork("p", "c")
    assert cache2.blocks_to_append("c", 1) == 1 and not cache2.can_append("c", 1)
    with pytest.raises(H.OutOfBlocks):
        cache2.append_tokens("c", 1)


def test_waste_formulas_on_hand_computed_cases():
    # Contiguous: every sequence reserves max_len = 10 slots.
    assert H.contiguous_waste([3, 10, 7], max_len=10) == 7 + 0 + 3
    # Paged, blocks of 4: 3 -> 1 block (1 wasted), 10 -> 3 blocks (2), 7 -> 2 blocks (1), 8 -> 2 (0).
    assert H.paged_waste([3, 10, 7, 8], block_size=4) == 1 + 2 + 1 + 0
    assert H.paged_waste([], block_size=16) == 0
    with pytest.raises(ValueError):
        H.contiguous_waste([11], max_len=10)
    # The cache object reports the same waste as the formula.
    cache = H.PagedKVCache(num_blocks=20, block_size=4)
    for i, n in enumerate([3, 10, 7, 8]):
        cache.add_sequence(i)
        cache.append_tokens(i, n)
    assert cache.memory_waste() == 4
    assert cache.stats()["waste_slots"] == 4


def test_paged_waste_is_below_one_block_per_sequence():
    rng = random.Random(0)
    for block_size in (1, 4, 16, 32):
        lengths = [rng.randint(1, 4096) for _ in range(500)]
        for n in lengths:
            assert 0 <= H.paged_waste([n], block_size) < block_size
        assert H.paged_waste(lengths, block_size) < len(lengths) * block_size
        assert H.paged_waste(lengths, block_size) <= H.contiguous_waste(lengths, 4096)


def test_sample_lengths_is_reproducible_and_clipped():
    lengths = H.sample_lengths(2000, seed=1, max_len=2048)
    assert lengths == H.sample_lengths(2000, seed=1, max_len=2048)
    assert all(isinstance(n, int) and 1 <= n <= 2048 for n in lengths)
    assert 200 < sorted(lengths)[1000] < 1000  # median near 300 + 150 tokens
    # The lab's headline: on such lengths contiguous reservation wastes most of the memory, paging
    # wastes less than half a block per sequence on average.
    assert H.contiguous_waste(lengths, 2048) > 0.5 * 2048 * len(lengths)
    assert H.paged_waste(lengths, 16) < 16 * len(lengths)


# ==================================================================================================
# Part 2 - speculative decoding
# ==================================================================================================

def test_expected_tokens_per_step():
    assert H.expected_tokens_per_step(0.5, 1) == pytest.approx(1.5)  # 1 + 0.5
    assert H.expected_tokens_per_step(0.5, 4) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)
    assert H.expected_tokens_per_step(0.8, 4) == pytest.approx((1 - 0.8**5) / 0.2)
    assert H.expected_tokens_per_step(0.0, 4) == 1.0
    assert H.expected_tokens_per_step(1e-9, 4) == pytest.approx(1.0)
    assert H.expected_tokens_per_step(1.0, 4) == 5.0
    assert H.expected_tokens_per_step(1 - 1e-9, 4) == pytest.approx(5.0, rel=1e-6)


# The 0.999 quantile of the chi-square distribution with 7 degrees of freedom (8 categories - 1),
# from standard tables: a correct sampler exceeds it once in a thousand seeds.
CHI2_CRITICAL_DF7_P001 = 24.322


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_rejection_sampling_reproduces_the_target_distribution():
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]), dim=0)  # target
    q = torch.softmax(torch.tensor([0.0, 1.5, 0.5, 1.0, 0.5, -1.0, -0.5, 0.8]), dim=0)  # draft
    n = 50_000
    gen = torch.Generator().manual_seed(0)
    draft_tokens = torch.multinomial(q, n, replacement=True, generator=gen)  # what a draft proposes
    tokens, accepted = H.rejection_sample_step(p.expand(n, 8), q.expand(n, 8), draft_tokens, gen)
    counts = torch.bincount(tokens, minlength=8).float()

    assert chi_square(counts, p) < CHI2_CRITICAL_DF7_P001
    # Negative control: the draft's own distribution is rejected by the same test, by far.
    assert chi_square(counts, q) > 10 * CHI2_CRITICAL_DF7_P001
    assert chi_square(torch.bincount(draft_tokens, minlength=8).float(), p) > 10 * CHI2_CRITICAL_DF7_P001
    # Theory: P(accept) = sum_x min(p(x), q(x)). Four standard errors of tolerance.
    alpha = float(torch.minimum(p, q).sum())
    assert abs(float(accepted.float().mean()) - alpha) < 4 * math.sqrt(alpha * (1 - alpha) / n)


def test_rejection_step_single_token_and_identical_distributions():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gen = torch.Generator().manual_seed(1)
    for token in range(4):  # p == q: always accepted, the draft token is kept
        out, ok = H.rejection_sample_step(p, p, token, gen)
        assert bool(ok) and int(out) == token and out.shape == ()
    # A token the target finds impossible is always replaced by one it finds possible.
    p = torch.tensor([0.0, 0.5, 0.5, 0.0])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    for _ in range(20):
        out, ok = H.rejection_sample_step(p, q, 0, gen)
        assert not bool(ok) and int(out) in (1, 2)


def _prompt_ids(tokenizer, text):
    return tokenizer(text, return_tensors="pt").input_ids


def test_make_draft_shares_weights_and_keeps_the_first_layers(model_and_tokenizer):
    model, _ = model_and_tokenizer
    draft = H.make_draft(model, 6)
    assert len(draft.model.layers) == 6 and draft.config.num_hidden_layers == 6
    assert model.config.num_hidden_layers == 30 and len(model.model.layers) == 30
    assert draft.model.layers[5] is model.model.layers[5]
    assert draft.lm_head.weight is model.lm_head.weight
    assert draft.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert all(p.device.type == "cpu" for p in draft.parameters())  # nothing left on "meta"
    with pytest.raises(ValueError):
        H.make_draft(model, 31)


@pytest.mark.parametrize("prompt", ["The capital of France is", "def fibonacci(n):"])
def test_greedy_speculative_equals_target_greedy(model_and_tokenizer, prompt):
    model, tokenizer = model_and_tokenizer
    draft = H.make_draft(model, 6)
    ids = _prompt_ids(tokenizer, prompt)
    expected, base_stats = H.autoregressive_generate(model, ids, max_new_tokens=24)
    tokens, stats = H.speculative_generate(model, draft, ids, max_new_tokens=24, k=4)
    assert tokens.tolist() == expected.tolist()
    assert base_stats["target_forward_passes"] == 24
    # Bookkeeping: each target pass yields the accepted draft tokens plus exactly one target token.
    assert stats["new_tokens"] == 24
    assert stats["accepted"] + stats["target_forward_passes"] == 24
    assert 0 <= stats["accepted"] <= stats["proposed"] <= 4 * stats["target_forward_passes"]
    assert stats["rejected"] <= stats["target_forward_passes"]  # at most one rejection per step
    assert stats["acceptance_rate"] <= stats["alpha"] <= 1
    print(f"\n{prompt!r}: {stats}")


def test_speculative_with_a_perfect_draft_takes_k_plus_1_tokens_per_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = _prompt_ids(tokenizer, "Once upon a time")
    # The target as its own draft agrees with itself: every proposal is accepted, greedy and sampled.
    _, greedy = H.speculative_generate(model, model, ids, max_new_tokens=10, k=4)
    assert greedy["acceptance_rate"] == 1.0 and greedy["target_forward_passes"] == 2
    assert greedy["alpha"] == 1.0 and greedy["rejected"] == 0
    # The i.i.d. formula is exact here: alpha = 1 gives k + 1 tokens per target pass.
    assert greedy["tokens_per_target_pass"] == H.expected_tokens_per_step(greedy["alpha"], 4)
    assert greedy["tokens_per_target_pass"] == 5.0
    gen = torch.Generator().manual_seed(0)
    tokens, sampled = H.speculative_generate(model, model, ids, max_new_tokens=5, k=4, temperature=0.8,
                                             generator=gen)
    assert sampled["acceptance_rate"] == 1.0 and len(tokens) == 5


def test_sampled_speculative_decoding_runs_with_a_small_draft(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    draft = H.make_draft(model, 6)
    ids = _prompt_ids(tokenizer, "Once upon a time")
    gen = torch.Generator().manual_seed(0)
    tokens, stats = H.speculative_generate(model, draft, ids, max_new_tokens=8, k=3, temperature=1.0,
                                           generator=gen)
    assert len(tokens) == 8 and stats["accepted"] + stats["target_forward_passes"] == 8
    gen = torch.Generator().manual_seed(0)
    baseline, _ = H.autoregressive_generate(model, ids, max_new_tokens=3, temperature=1.0, generator=gen)
    assert len(baseline) == 3


# ==================================================================================================
# Part 3 - weight-only quantization
# ==================================================================================================

def test_int8_per_channel_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(96, 200) * torch.rand(96, 1) * 3  # rows with different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = H.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (96,)
    assert int(q.abs().max()) == 127
    error = (w - H.dequantize_int8(q, scale)).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-6)
    assert torch.all(H.dequantize_int8(q, scale)[5] == 0)


def test_pack_unpack_int4_round_trip_all_values():
    values = torch.arange(-8, 8, dtype=torch.int8)  # all 16 int4 values
    grid = torch.cartesian_prod(values, values).reshape(16, 32)  # every (low, high) pair in a byte
    packed = H.pack_int4(grid)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 16)
    assert torch.equal(H.unpack_int4(packed), grid)
    assert sorted(set(packed.flatten().tolist())) == list(range(256))  # all 256 byte patterns
    with pytest.raises(ValueError):
        H.pack_int4(torch.tensor([8, 0], dtype=torch.int8))


def test_int4_groupwise_error_and_storage():
    torch.manual_seed(1)
    out_features, in_features, group = 64, 256, 64
    w = torch.randn(out_features, in_features)
    w[:, :64] *= 10  # one group per row with much larger weights
    packed, scales = H.quantize_int4_groupwise(w, group_size=group)
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, in_features // 2)
    assert scales.shape == (out_features, in_features // group)
    deq = H.dequantize_int4(packed, scales, group_size=group)
    step = scales.repeat_interleave(group, dim=1)  # each weight's own group scale
    assert torch.all((w - deq).abs() <= step / 2 + 1e-6)
    # Storage: half a byte per weight (1/8 of float32) plus one float32 scale per 64 weights.
    fp32_bytes = w.numel() * 4
    stored = packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
    assert stored == fp32_bytes / 8 + fp32_bytes / 64
    with pytest.raises(ValueError):
        H.quantize_int4_groupwise(torch.randn(4, 100), group_size=64)


def test_quant_linear_matches_its_dequantized_weight():
    torch.manual_seed(2)
    linear = torch.nn.Linear(128, 32, bias=True)
    x = torch.randn(3, 128)
    for bits in (8, 4):
        qlinear = H.QuantLinear(linear, bits=bits)
        expected = x @ qlinear.dequantized_weight().T + linear.bias
        assert torch.allclose(qlinear(x), expected, atol=1e-5)
        assert torch.allclose(qlinear(x), linear(x), atol=0.05 if bits == 8 else 0.5)


def test_quantize_model_shrinks_linears_and_keeps_the_answer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    fp32_bytes = H.model_weight_bytes(model)
    int8 = H.quantize_model(copy.deepcopy(model), bits=8)
    quantized = [m for m in int8.modules() if isinstance(m, H.QuantLinear)]
    assert len(quantized) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 layers
    assert isinstance(int8.lm_head, torch.nn.Linear)  # skipped (tied to the embeddings)
    linear_fp32 = sum(m.in_features * m.out_features * 4 for m in quantized)
    linear_int8 = sum(m.weight_bytes() for m in quantized)
    assert linear_int8 < 0.3 * linear_fp32
    assert H.model_weight_bytes(int8) < 0.5 * fp32_bytes  # embeddings stay float32
    print(f"\nweight bytes: fp32 {fp32_bytes:,}, int8 {H.model_weight_bytes(int8):,}")

    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = int8.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_int8_perplexity_close_to_float32(model_and_tokenizer, gpl_text, fp32_perplexity):
    model, tokenizer = model_and_tokenizer
    int8 = H.quantize_model(copy.deepcopy(model), bits=8)
    ppl8 = H.perplexity(int8, tokenizer, gpl_text)
    print(f"\nperplexity on {len(gpl_text)} chars of GPL-3: fp32 {fp32_perplexity:.3f}, int8 {ppl8:.3f}")
    assert 1 < fp32_perplexity < 100  # an English-speaking model on English text
    # Measured: 18.960 vs 18.957 (0.02 %). 1 % leaves a wide margin and still catches a broken scale.
    assert abs(ppl8 - fp32_perplexity) / fp32_perplexity < 0.01


def test_int4_perplexity_is_reported(model_and_tokenizer, gpl_text, fp32_perplexity):
    model, tokenizer = model_and_tokenizer
    int4 = H.quantize_model(copy.deepcopy(model), bits=4, group_size=64)
    ppl4 = H.perplexity(int4, tokenizer, gpl_text)
    print(f"\nperplexity: fp32 {fp32_perplexity:.3f}, int4 g64 {ppl4:.3f}; "
          f"weight bytes int4 {H.model_weight_bytes(int4):,}")
    assert math.isfinite(ppl4) and ppl4 >= fp32_perplexity


def test_perplexity_sliding_window_scores_every_token_once():
    # A fake model and tokenizer make the bookkeeping checkable by hand. The "text" of n characters
    # becomes token ids 0, 1, ..., n - 1. After id i the model gives the true next id (i + 1) a
    # logit of 0.1 * i and every other id 0, so each token has its own loss, whatever the window.
    # The perplexity is exact only if each of the n - 1 predictable tokens is scored exactly once.
    vocab = 64

    class NextIdModel(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            logits = torch.zeros(*input_ids.shape, vocab)
            logits.scatter_(-1, (input_ids + 1).unsqueeze(-1), (0.1 * input_ids.float()).unsqueeze(-1))
            return type("Output", (), {"logits": logits})()

    class CountingTokenizer:
        def __call__(self, text, return_tensors=None):
            return type("Encoding", (), {"input_ids": torch.arange(len(text)).unsqueeze(0)})()

    n = 37
    boost = 0.1 * torch.arange(n - 1, dtype=torch.float64)
    nll = -(boost - torch.log(vocab - 1 + torch.exp(boost)))  # -log softmax of the true next id
    expected = math.exp(float(nll.mean()))
    for max_length, stride in ((8, 7), (8, 3), (10, 7), (2, 1), (100, 50), (37, 36)):
        got = H.perplexity(NextIdModel(), CountingTokenizer(), "x" * n, max_length, stride)
        assert got == pytest.approx(expected, rel=1e-6), (max_length, stride)
    with pytest.raises(ValueError, match="stride"):  # disjoint windows would skip tokens
        H.perplexity(NextIdModel(), CountingTokenizer(), "x" * n, max_length=8, stride=8)


def test_offline_english_text(tmp_path):
    text = H.offline_english_text(max_chars=500)
    assert len(text) == 500 and "GNU GENERAL PUBLIC LICENSE" in text and "  " not in text
    with pytest.raises(FileNotFoundError, match="Fix"):
        H.offline_english_text(path=tmp_path / "missing.txt")
