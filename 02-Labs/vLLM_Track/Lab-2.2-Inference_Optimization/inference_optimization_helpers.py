"""Lab 2.2 - Inference Optimization: three techniques vLLM uses, rebuilt from scratch to be read.

vLLM does all of this in optimized kernels. Here every idea is written in plain Python and PyTorch,
small enough to read in one sitting, so the notebooks can show *why* each technique works before
they measure it in vLLM.

1. Paged KV cache (bookkeeping only)
   How much memory the KV cache needs per token, and how vLLM's PagedAttention hands out that
   memory in fixed-size blocks: block tables, reference counts, forking for parallel sampling and
   copy-on-write. No attention math: only which token lives in which block.

2. Speculative decoding
   A small *draft* model guesses k tokens, the big *target* model checks all of them in one forward
   pass. Greedy decoding gives exactly the target's output; sampling uses the rejection rule of
   Leviathan et al. (2023) and Chen et al. (2023), which gives exactly the target's distribution.

3. Weight-only quantization
   int8 per output channel and int4 per group of 64 weights, a ``QuantLinear`` module that
   dequantizes on the fly, model size in bytes and sliding-window perplexity to measure the damage.

Everything runs on a CPU with the course's embedded model (SmolLM2-135M-Instruct).
"""
from __future__ import annotations

import copy
import math
import re
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    # Part 1: paged KV cache
    "kv_bytes_per_token", "kv_bytes_per_token_from_config", "blocks_needed", "OutOfBlocks",
    "BlockAllocator", "PagedKVCache", "contiguous_waste", "paged_waste", "sample_lengths",
    # Part 2: speculative decoding
    "make_draft", "rejection_sample_step", "speculative_generate", "autoregressive_generate",
    "expected_tokens_per_step",
    # Part 3: weight-only quantization
    "quantize_int8_per_channel", "dequantize_int8", "pack_int4", "unpack_int4",
    "quantize_int4_groupwise", "dequantize_int4", "QuantLinear", "quantize_model",
    "model_weight_bytes", "perplexity", "offline_english_text",
]


# ==================================================================================================
# Part 1 - Paged KV cache
# ==================================================================================================
#
# For every token it has seen, each decoder layer keeps a Key vector and a Value vector per KV head.
# That is the KV cache. A naive server reserves room for ``max_len`` tokens per request up front
# ("contiguous" allocation) and wastes whatever the request does not use. vLLM's PagedAttention
# (Kwon et al., SOSP 2023) instead cuts the cache into small fixed-size *blocks* (16 tokens by
# default) and gives a sequence a new block only when its last one is full, exactly like an
# operating system hands out memory pages. A per-sequence *block table* maps logical block i of the
# sequence to a physical block id.


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of KV cache one token occupies: 2 (K and V) x layers x KV heads x head_dim x bytes.

    With grouped-query attention (GQA) only the *KV* heads count, not the query heads: that is the
    whole point of GQA. Example, SmolLM2-135M in float32: 2 * 30 * 3 * 64 * 4 = 46,080 bytes.
    """
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def kv_bytes_per_token_from_config(config, dtype_bytes: int) -> int:
    """``kv_bytes_per_token`` read from a model config: a dict (config.json) or a transformers config."""

    def get(key, default=None):
        if isinstance(config, dict):
            return config.get(key, default)
        return getattr(config, key, default)

    num_heads = get("num_attention_heads")
    num_kv_heads = get("num_key_value_heads") or num_heads  # no GQA field: every head has its own K/V
    head_dim = get("head_dim") or get("hidden_size") // num_heads  # older configs omit head_dim
    return kv_bytes_per_token(get("num_hidden_layers"), num_kv_heads, head_dim, dtype_bytes)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """How many blocks hold ``num_tokens`` tokens: the ceiling of num_tokens / block_size."""
    return (num_tokens + block_size - 1) // block_size


class OutOfBlocks(RuntimeError):
    """The block pool is empty. A real server would now preempt (pause) a sequence to make room."""


class BlockAllocator:
    """A pool of ``num_blocks`` physical blocks of ``block_size`` token slots each.

    It keeps a free list and a reference count per block. A block shared by several sequences
    (after a fork) has a count above 1 and goes back to the free list only when the last sequence
    using it lets it go.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be at least 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = deque(range(num_blocks))  # ids of free blocks, handed out from the left
        self._refcount = [0] * num_blocks  # 0 means free

    @property
    def num_free(self) -> int:
        """Blocks in the free list."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self._free)

    def allocate(self) -> int:
        """Take a free block; its reference count becomes 1."""
        if not self._free:
            raise OutOfBlocks(
                f"all {self.num_blocks} blocks of {self.block_size} tokens are in use. Free a sequence "
                f"(a server would preempt one) or create the cache with more blocks."
            )
        block_id = self._free.popleft()
        self._refcount[block_id] = 1
        return block_id

    def incref(self, block_id: int) -> None:
        """One more sequence uses this block (used by ``fork``)."""
        self._check_in_use(block_id)
        self._refcount[block_id] += 1

    def free(self, block_id: int) -> None:
        """One sequence stops using this block; the block is freed when nobody uses it any more."""
        self._check_in_use(block_id)
        self._refcount[block_id] -= 1
        if self._refcount[block_id] == 0:
            self._free.append(block_id)

    def refcount(self, block_id: int) -> int:
        """How many sequences use this block (0: it is free)."""
        return self._refcount[block_id]

    def _check_in_use(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block {block_id} does not exist (the pool has {self.num_blocks})")
        if self._refcount[block_id] == 0:
            raise ValueError(f"block {block_id} is free; freeing or sharing it again is a bug")


class PagedKVCache:
    """Block tables of many sequences over one ``BlockAllocator``: the bookkeeping of PagedAttention.

    Only token *counts* are tracked, not the K/V numbers themselves. Token t of a sequence lives in
    logical block t // block_size, slot t % block_size; ``block_table(seq_id)[t // block_size]`` is
    the physical block.

    ``fork`` makes a child that shares all the parent's blocks (parallel sampling: n answers to one
    prompt share the prompt's KV cache). Full blocks can be shared forever, since nobody writes into
    them again. A *partially filled* last block is different: the next token of the parent and the
    next token of the child would go into the same slot. So before writing into a shared last block,
    a sequence gets its own copy of it: *copy-on-write*, counted in ``copy_on_write_events``.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.allocator = BlockAllocator(num_blocks, block_size)
        self.block_size = block_size
        self._tables: dict = {}  # seq_id -> list of physical block ids
        self._lengths: dict = {}  # seq_id -> number of tokens stored
        self.copy_on_write_events = 0

    # -- sequences -------------------------------------------------------------------------------

    def add_sequence(self, seq_id) -> None:
        """Register an empty sequence (it gets blocks when tokens are appended)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0

    def fork(self, parent_id, child_id) -> None:
        """Create ``child_id`` sharing every block of ``parent_id`` (no copy, reference counts + 1)."""
        self._check_exists(parent_id)
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} already exists")
        for block_id in self._tables[parent_id]:
            self.allocator.incref(block_id)
        self._tables[child_id] = list(self._tables[parent_id])
        self._lengths[child_id] = self._lengths[parent_id]

    def free_sequence(self, seq_id) -> None:
        """Drop a finished sequence; blocks still shared with other sequences stay allocated."""
        self._check_exists(seq_id)
        for block_id in self._tables.pop(seq_id):
            self.allocator.free(block_id)
        del self._lengths[seq_id]

    # -- tokens ----------------------------------------------------------------------------------

    def blocks_to_append(self, seq_id, n: int) -> int:
        """How many free blocks ``append_tokens(seq_id, n)`` would take (new blocks + a CoW copy)."""
        self._check_exists(seq_id)
        length = self._lengths[seq_id]
        new_blocks = blocks_needed(length + n, self.block_size) - blocks_needed(length, self.block_size)
        return new_blocks + (1 if n > 0 and self._must_copy_last_block(seq_id) else 0)

    def can_append(self, seq_id, n: int) -> bool:
        """True when there are enough free blocks to append ``n`` tokens (what a scheduler asks)."""
        return self.blocks_to_append(seq_id, n) <= self.allocator.num_free

    def append_tokens(self, seq_id, n: int = 1) -> None:
        """Store ``n`` more tokens of a sequence, taking new blocks only when the last one is full.

        Raises ``OutOfBlocks`` *before* changing anything if the pool cannot hold them, so the
        caller can preempt something and retry.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        needed = self.blocks_to_append(seq_id, n)
        if needed > self.allocator.num_free:
            raise OutOfBlocks(
                f"appending {n} tokens to sequence {seq_id!r} needs {needed} free blocks, "
                f"only {self.allocator.num_free} left."
            )
        table = self._tables[seq_id]
        for _ in range(n):  # one token at a time: slow, but every case is visible
            slot = self._lengths[seq_id] % self.block_size
            if slot == 0:
                # The last block is full (or there is none yet): start a new block.
                table.append(self.allocator.allocate())
            elif self._must_copy_last_block(seq_id):
                # Copy-on-write: the last block is shared and half full. Take a private copy (a real
                # engine would copy the K/V numbers of its filled slots now) and drop our reference
                # to the shared one.
                shared = table[-1]
                table[-1] = self.allocator.allocate()
                self.allocator.free(shared)
                self.copy_on_write_events += 1
            self._lengths[seq_id] += 1

    def _must_copy_last_block(self, seq_id) -> bool:
        """True when the next token would be written into a partially filled block that is shared."""
        table = self._tables[seq_id]
        partially_filled = self._lengths[seq_id] % self.block_size != 0
        return partially_filled and self.allocator.refcount(table[-1]) > 1

    # -- inspection ------------------------------------------------------------------------------

    def block_table(self, seq_id) -> list:
        """Physical block ids of the sequence, in order (a copy)."""
        self._check_exists(seq_id)
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id) -> int:
        """Tokens stored for the sequence."""
        self._check_exists(seq_id)
        return self._lengths[seq_id]

    @property
    def sequences(self) -> list:
        """Ids of the sequences in the cache."""
        return list(self._tables)

    @property
    def used_blocks(self) -> int:
        """Physical blocks in use (a block shared by several sequences counts once)."""
        return self.allocator.num_used

    def memory_waste(self, seq_id=None) -> int:
        """Reserved token slots minus stored tokens, for one sequence or (default) summed over all.

        With paging the only waste is the unused tail of each sequence's last block, so for one
        sequence it is always below ``block_size``.
        """
        ids = [seq_id] if seq_id is not None else list(self._tables)
        waste = 0
        for sid in ids:
            self._check_exists(sid)
            waste += len(self._tables[sid]) * self.block_size - self._lengths[sid]
        return waste

    def stats(self) -> dict:
        """A summary of the cache, ready to print or to put in a table."""
        shared = sum(1 for b in range(self.allocator.num_blocks) if self.allocator.refcount(b) > 1)
        tokens = sum(self._lengths.values())
        return {
            "sequences": len(self._tables),
            "tokens": tokens,  # logical: a shared prompt counts once per sequence
            "used_blocks": self.used_blocks,
            "free_blocks": self.allocator.num_free,
            "shared_blocks": shared,
            "allocated_slots": self.used_blocks * self.block_size,  # physical
            "waste_slots": self.memory_waste(),  # unused tails of last blocks
            "copy_on_write_events": self.copy_on_write_events,
        }

    def _check_exists(self, seq_id) -> None:
        if seq_id not in self._tables:
            raise KeyError(f"unknown sequence {seq_id!r}")


def contiguous_waste(lengths, max_len: int) -> int:
    """Slots reserved minus tokens used when every sequence reserves ``max_len`` slots up front."""
    lengths = [int(n) for n in lengths]
    if any(n > max_len for n in lengths):
        raise ValueError(f"a sequence is longer than max_len={max_len}")
    return sum(max_len - n for n in lengths)


def paged_waste(lengths, block_size: int) -> int:
    """Slots reserved minus tokens used when each sequence takes whole blocks of ``block_size``."""
    return sum(blocks_needed(int(n), block_size) * block_size - int(n) for n in lengths)


def sample_lengths(n: int, seed: int = 0, prompt_median: float = 300.0, prompt_sigma: float = 1.0,
                   output_median: float = 150.0, output_sigma: float = 0.8, max_len: int = 2048) -> list:
    """``n`` made-up sequence lengths (prompt + output tokens), to compare allocation strategies.

    ASSUMPTION, NOT DATA. Prompt and output lengths are each drawn from a lognormal distribution
    (``median`` = exp(mu), ``sigma`` = spread of the log), because real chat traffic is long-tailed:
    many short requests, a few very long ones. The default medians (300 prompt tokens, 150 output
    tokens) are round numbers chosen for illustration, not measured on any real service. The sum is
    clipped to [1, max_len], as a server with ``max_model_len = max_len`` would do.
    """
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(mean=math.log(prompt_median), sigma=prompt_sigma, size=n)
    output = rng.lognormal(mean=math.log(output_median), sigma=output_sigma, size=n)
    total = np.clip(np.round(prompt + output), 1, max_len).astype(int)
    return [int(x) for x in total]


# ==================================================================================================
# Part 2 - Speculative decoding
# ==================================================================================================
#
# Decoding one token costs a full pass over the weights, whatever the number of tokens in the pass:
# on a GPU, small-batch decoding is limited by memory bandwidth, not arithmetic. Speculative
# decoding exploits this. A cheap draft model proposes k tokens one by one; the target model then
# scores all k proposals (plus one extra position) in ONE forward pass, and keeps the longest prefix
# it agrees with. Every step yields between 1 and k + 1 tokens for one target pass.
#
# SIMPLIFICATION: there is no KV cache here. Every forward pass recomputes the whole prefix
# (``use_cache=False``). That is slow but keeps the code short, and it changes nothing about which
# tokens are produced or how many target passes are needed - the quantities the lab studies.
# Only batch size 1 is supported.


def make_draft(model: nn.Module, num_layers: int) -> nn.Module:
    """A draft model: the first ``num_layers`` decoder layers of a Llama-style Hugging Face model.

    Nothing is copied: the draft *shares* the embeddings, those first layers, the final norm and the
    LM head with ``model`` (so changing one changes the other). Skipping the upper layers gives a
    cheaper, worse model that still speaks the same vocabulary - a "self-speculative" draft that needs
    no training.

    Expect a poor draft: the final norm and LM head were trained to read the output of the LAST
    layer, not of layer ``num_layers``. On SmolLM2-135M (greedy, k = 4) we measured a per-token
    acceptance (``alpha``) of about 0.03 with 6 of 30 layers and 0.39 with 24; an int4-quantized copy
    of the whole model (``quantize_model``) reached 0.59. Production systems train their drafts.
    """
    total = model.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ValueError(f"num_layers must be between 1 and {total}")
    draft_config = copy.deepcopy(model.config)
    draft_config.num_hidden_layers = num_layers
    # Build the skeleton on the "meta" device: no memory is allocated for weights we are about to
    # replace by the target's own modules.
    with torch.device("meta"):
        draft = type(model)(draft_config)
    draft.model.embed_tokens = model.model.embed_tokens
    draft.model.layers = nn.ModuleList(model.model.layers[:num_layers])
    draft.model.norm = model.model.norm
    draft.model.rotary_emb = model.model.rotary_emb
    draft.lm_head = model.lm_head
    draft.generation_config = copy.deepcopy(model.generation_config)
    return draft.eval()


@torch.inference_mode()
def _next_token_logits(model: nn.Module, ids: torch.Tensor, num_positions: int = 1) -> torch.Tensor:
    """Logits predicting the token after each of the last ``num_positions`` positions of ``ids``.

    ``ids`` is 1-D. Returns [num_positions, vocab]. Recomputes the full prefix (no KV cache).
    ``logits_to_keep`` asks the model to apply its LM head (a 49,152 x 576 matrix for SmolLM2) to
    the last positions only, since the others are never used.
    """
    out = model(input_ids=ids.unsqueeze(0), use_cache=False, logits_to_keep=num_positions)
    return out.logits[0, -num_positions:].float()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax with temperature."""
    return torch.softmax(logits / temperature, dim=-1)


def _as_1d(input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError("only batch size 1 is supported")
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError("input_ids must have shape [T] or [1, T]")
    return ids


def rejection_sample_step(p: torch.Tensor, q: torch.Tensor, draft_token, generator=None):
    """Accept or replace one draft token so that the result is distributed exactly as ``p``.

    ``p``: target probabilities, ``q``: draft probabilities (the distribution ``draft_token`` was
    sampled from), both [..., vocab]; ``draft_token``: int or tensor of shape [...]. The rule
    (Leviathan et al. 2023, Chen et al. 2023):

    * accept the draft token x with probability min(1, p(x) / q(x));
    * otherwise sample a replacement from the residual norm(max(0, p - q)).

    Why it works: P(output = y) = q(y) min(1, p(y)/q(y)) + P(reject) * residual(y) = p(y).
    Returns ``(token, accepted)``, tensors shaped like ``draft_token``. Extra leading dimensions
    let a test draw thousands of independent steps in one call; the generator uses shape [].
    """
    draft_token = torch.as_tensor(draft_token, dtype=torch.long)
    p_x = p.gather(-1, draft_token.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, draft_token.unsqueeze(-1)).squeeze(-1)
    accept_prob = torch.clamp(p_x / q_x, max=1.0)  # q_x > 0: the draft sampled x from q
    u = torch.rand(accept_prob.shape, generator=generator, dtype=accept_prob.dtype)
    accepted = u < accept_prob

    # The residual distribution, used when the draft token is rejected.
    residual = torch.clamp(p - q, min=0.0)
    residual_mass = residual.sum(-1, keepdim=True)
    # If p == q the residual is all zeros, but then rejection cannot happen; use p to avoid 0 / 0.
    residual = torch.where(residual_mass > 0, residual / residual_mass.clamp_min(1e-30), p)
    vocab = p.shape[-1]
    resampled = torch.multinomial(residual.reshape(-1, vocab), 1, generator=generator)
    resampled = resampled.reshape(draft_token.shape)

    token = torch.where(accepted, draft_token, resampled)
    return token, accepted


def _sample(probs: torch.Tensor, generator=None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _stats(proposed, accepted, rejected, target_passes, draft_passes, new_tokens, steps) -> dict:
    checked = accepted + rejected
    return {
        "proposed": proposed,  # draft tokens offered to the target
        "accepted": accepted,  # of those, kept
        "rejected": rejected,  # steps that ended on a rejected draft token
        # vLLM's "draft acceptance rate": accepted / proposed. Proposals after the first rejection of
        # a step are counted as proposed but never had a chance, so this is below alpha.
        "acceptance_rate": accepted / proposed if proposed else float("nan"),
        # alpha: the chance that a draft token is accepted *when the target looks at it*, the
        # quantity that ``expected_tokens_per_step`` expects.
        "alpha": accepted / checked if checked else float("nan"),
        "target_forward_passes": target_passes,
        "draft_forward_passes": draft_passes,
        "new_tokens": new_tokens,
        "tokens_per_target_pass": new_tokens / target_passes if target_passes else float("nan"),
        "steps": steps,
    }


def autoregressive_generate(model: nn.Module, input_ids, max_new_tokens: int, temperature: float = 0.0,
                            generator=None, eos_token_id=None):
    """The baseline: one target forward pass per new token.

    ``temperature == 0`` picks the argmax (greedy); otherwise samples from softmax(logits / T).
    Stops early after ``eos_token_id`` if given. Returns ``(new_tokens, stats)``: a 1-D tensor of the
    generated ids only (no prompt) and the same statistics dict as ``speculative_generate``.
    """
    ids = _as_1d(input_ids)
    new = []
    for _ in range(max_new_tokens):
        logits = _next_token_logits(model, torch.cat([ids, torch.tensor(new, dtype=torch.long)]))[0]
        if temperature == 0:
            token = int(logits.argmax())
        else:
            token = _sample(_probs(logits, temperature), generator)
        new.append(token)
        if token == eos_token_id:
            break
    stats = _stats(0, 0, 0, len(new), 0, len(new), len(new))
    return torch.tensor(new, dtype=torch.long), stats


def speculative_generate(target: nn.Module, draft: nn.Module, input_ids, max_new_tokens: int, k: int,
                         temperature: float = 0.0, generator=None, eos_token_id=None):
    """Speculative decoding: the draft proposes ``k`` tokens, the target verifies them in one pass.

    Greedy (``temperature == 0``): keep draft tokens while they equal the target's argmax; at the
    first mismatch take the target's argmax instead; if all k match, add the target's next argmax
    (the "bonus" token). The output is exactly the target's own greedy output.

    Sampling (``temperature > 0``): the same loop, with ``rejection_sample_step`` deciding each
    draft token and the bonus token sampled from the target; the output follows exactly the
    target's distribution.

    Returns ``(new_tokens, stats)``: the generated ids only (1-D tensor) and a dict with
    ``proposed``, ``accepted``, ``rejected``, ``acceptance_rate`` (accepted / proposed, as vLLM
    reports it), ``alpha`` (accepted / (accepted + rejected): the per-token acceptance probability
    of ``expected_tokens_per_step``), ``target_forward_passes``, ``draft_forward_passes``,
    ``new_tokens``, ``tokens_per_target_pass`` and ``steps``.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    greedy = temperature == 0
    ids = _as_1d(input_ids)
    new: list = []
    proposed = accepted_total = rejected_total = target_passes = draft_passes = steps = 0

    while len(new) < max_new_tokens and (eos_token_id is None or eos_token_id not in new):
        steps += 1
        prefix = torch.cat([ids, torch.tensor(new, dtype=torch.long)])
        # Never propose more than the budget can take: a step adds up to (proposals + 1) tokens.
        k_step = min(k, max_new_tokens - len(new) - 1)

        # 1. The draft proposes k_step tokens, one forward pass each.
        draft_tokens, draft_probs = [], []
        for _ in range(k_step):
            draft_prefix = torch.cat([prefix, torch.tensor(draft_tokens, dtype=torch.long)])
            logits = _next_token_logits(draft, draft_prefix)[0]
            draft_passes += 1
            if greedy:
                token = int(logits.argmax())
            else:
                q = _probs(logits, temperature)
                token = _sample(q, generator)
                draft_probs.append(q)
            draft_tokens.append(token)
            if token == eos_token_id:
                break  # no point guessing past the end
        proposed += len(draft_tokens)

        # 2. ONE target pass scores every proposal: row i predicts the token after prefix + the
        #    first i draft tokens, so there are len(draft_tokens) + 1 rows (the last one is the bonus).
        candidate = torch.cat([prefix, torch.tensor(draft_tokens, dtype=torch.long)])
        target_logits = _next_token_logits(target, candidate, num_positions=len(draft_tokens) + 1)
        target_passes += 1

        # 3. Keep the agreed prefix, then one token from the target.
        step_tokens = []
        for i, token in enumerate(draft_tokens):
            if greedy:
                target_token = int(target_logits[i].argmax())
                ok = token == target_token
                chosen = token if ok else target_token
            else:
                p = _probs(target_logits[i], temperature)
                chosen_t, ok_t = rejection_sample_step(p, draft_probs[i], token, generator)
                chosen, ok = int(chosen_t), bool(ok_t)
            step_tokens.append(chosen)
            if not ok:
                rejected_total += 1
                break  # the replacement token ends this step
            accepted_total += 1
        else:
            # Every draft token was accepted: the last target row gives a bonus token for free.
            bonus_logits = target_logits[len(draft_tokens)]
            if greedy:
                step_tokens.append(int(bonus_logits.argmax()))
            else:
                step_tokens.append(_sample(_probs(bonus_logits, temperature), generator))

        # An EOS ends generation: drop anything after it.
        if eos_token_id is not None and eos_token_id in step_tokens:
            step_tokens = step_tokens[: step_tokens.index(eos_token_id) + 1]
        new.extend(step_tokens)

    new = new[:max_new_tokens]
    stats = _stats(proposed, accepted_total, rejected_total, target_passes, draft_passes, len(new), steps)
    return torch.tensor(new, dtype=torch.long), stats


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """Expected tokens per target pass with k proposals, each accepted with probability ``alpha``.

    (1 - alpha**(k+1)) / (1 - alpha): a geometric series 1 + alpha + ... + alpha**k. It assumes
    every proposal is accepted independently with the same probability (i.i.d.), which real text
    does not obey exactly. Leviathan, Kalman & Matias, "Fast Inference from Transformers via
    Speculative Decoding", ICML 2023 (section 3). alpha -> 0 gives 1 token, alpha = 1 gives k + 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    if alpha == 1.0:
        return float(k + 1)  # the limit of the formula
    return (1 - alpha ** (k + 1)) / (1 - alpha)


# ==================================================================================================
# Part 3 - Weight-only quantization
# ==================================================================================================
#
# Store each weight matrix in fewer bits plus a few float scales, and turn it back into floats
# ("dequantize") when it is used. Decoding reads every weight once per token, so fewer bytes per
# weight means faster decoding on memory-bound hardware and a smaller model. Activations stay in
# floating point ("weight-only"). Both schemes below are *symmetric*: zero maps to zero and the
# scale is chosen so that the largest |weight| maps to the largest integer.
#
# Weight matrices of nn.Linear have shape [out_features, in_features]; a "row" is one output channel.


def _safe_scale(max_abs: torch.Tensor, qmax: int) -> torch.Tensor:
    """max|w| / qmax, with 1.0 for an all-zero row or group (any scale represents zeros exactly)."""
    scale = max_abs / qmax
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_int8_per_channel(w: torch.Tensor):
    """Symmetric int8 quantization with one scale per output row: scale = max|w_row| / 127.

    Returns ``(q, scale)``: int8 [out, in] with values in [-127, 127], float32 [out].
    Rounding to the nearest integer bounds the error by half a step: |w - q * scale| <= scale / 2.
    """
    w = w.detach().float()
    scale = _safe_scale(w.abs().amax(dim=1), 127)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Back to float32: q * scale of its row."""
    return q.float() * scale[:, None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor with values in [-8, 7], even last dimension) two per byte.

    Each value is shifted to an unsigned nibble 0..15 (add 8). Element 2i goes in the low 4 bits of
    byte i, element 2i + 1 in the high 4 bits. Returns uint8 with half the last dimension.
    """
    if q.shape[-1] % 2:
        raise ValueError("the last dimension must be even to pack two values per byte")
    if q.min() < -8 or q.max() > 7:
        raise ValueError("int4 values must be in [-8, 7]")
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8)
    low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    return low | (high << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: uint8 [..., n] -> int8 [..., 2n] with values in [-8, 7]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    # Interleave back: low nibbles are the even positions, high nibbles the odd ones.
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int4_groupwise(w: torch.Tensor, group_size: int = 64):
    """Symmetric int4 quantization with one scale per group of ``group_size`` weights of a row.

    scale = max|w_group| / 7, values rounded into [-7, 7]. The int4 range is [-8, 7]; using only
    [-7, 7] keeps the grid symmetric around zero (the -8 code is simply never produced), so the
    error is at most half a step: |w - q * scale| <= scale / 2. One scale per 64 weights (instead of
    per row, as for int8) is needed because 15 levels cannot cover a whole row's outliers well.

    Returns ``(packed, scales)``: uint8 [out, in / 2] (two values per byte), float32
    [out, in / group_size]. ``in_features`` must be a multiple of ``group_size``.
    """
    w = w.detach().float()
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
    groups = w.reshape(out_features, in_features // group_size, group_size)
    scales = _safe_scale(groups.abs().amax(dim=2), 7)
    q = torch.round(groups / scales[:, :, None]).clamp(-8, 7).to(torch.int8)
    return pack_int4(q.reshape(out_features, in_features)), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int = 64) -> torch.Tensor:
    """Back to float32 [out, in]: unpack, then multiply each group by its scale."""
    q = unpack_int4(packed).float()
    out_features, in_features = q.shape
    groups = q.reshape(out_features, in_features // group_size, group_size)
    return (groups * scales[:, :, None]).reshape(out_features, in_features)


class QuantLinear(nn.Module):
    """A drop-in replacement for ``nn.Linear`` that stores its weight as int8 or packed int4.

    ``forward`` dequantizes the whole weight to float and calls an ordinary matmul. That is SIMPLE,
    NOT FAST: it saves memory at rest but costs time and a temporary float copy on every call. Real
    kernels (e.g. Marlin, used by vLLM) dequantize small tiles inside the matmul instead.
    The quantized weight and its scales are *buffers*, not parameters: they are never trained.
    """

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int = 64):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError("bits must be 4 or 8")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        if bits == 8:
            qweight, scales = quantize_int8_per_channel(linear.weight)
        else:
            qweight, scales = quantize_int4_groupwise(linear.weight, group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight().to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def weight_bytes(self) -> int:
        """Bytes actually stored: the quantized weight, the scales and the bias."""
        tensors = [self.qweight, self.scales] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}" + (
            f", group_size={self.group_size}" if self.bits == 4 else "")


def quantize_model(model: nn.Module, bits: int, group_size: int = 64, skip=("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` by a ``QuantLinear``, IN PLACE; returns ``model``.

    A layer is left alone when any string of ``skip`` occurs in its name. The default skips
    ``lm_head``: in SmolLM2 it is tied to the embedding matrix (same tensor), which is not an
    nn.Linear weight we own, and the output layer is the most sensitive one anyway.
    Work on a copy (``copy.deepcopy(model)``) to keep the float model.
    """
    # Collect first, replace afterwards: changing a module while iterating over it is unsafe.
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not any(s in name for s in skip)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, QuantLinear(module, bits=bits, group_size=group_size))
    return model


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights actually stored: every parameter once, plus the quantized buffers.

    ``model.parameters()`` yields a shared (tied) tensor only once, so SmolLM2's embedding matrix,
    which doubles as its LM head, counts once. Other buffers (e.g. rotary-embedding tables) are not
    weights and are left out.
    """
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.qweight.numel() * module.qweight.element_size()
            total += module.scales.numel() * module.scales.element_size()
    return total


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer, text: str, max_length: int = 512, stride: int = 256) -> float:
    """Perplexity of ``model`` on ``text``, exp(mean negative log-likelihood per token).

    Sliding window: a text longer than ``max_length`` tokens is read in windows of ``max_length``
    that start every ``stride`` tokens. Each token is scored exactly once, in the first window that
    reaches it, and with up to ``max_length - stride`` tokens of context before it (instead of
    none, as cutting the text into disjoint chunks would give). Lower is better.

    ``stride`` must be smaller than ``max_length``: consecutive windows must overlap by at least one
    token, or the first token of each window would have nothing before it and never be scored.
    """
    if not 0 < stride < max_length:
        raise ValueError(f"need 0 < stride < max_length, got stride={stride}, max_length={max_length}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        raise ValueError("the text must have at least 2 tokens")
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = ids[begin:end]
        logits = model(input_ids=window.unsqueeze(0), use_cache=False).logits[0].float()
        # Position t predicts token t + 1, so there are len(window) - 1 predictions.
        losses = F.cross_entropy(logits[:-1], window[1:], reduction="none")
        # Score only the tokens not seen in an earlier window (the very first token of the text has
        # no prediction at all).
        num_new = min(end - prev_end, len(losses))
        nll_sum += float(losses[-num_new:].sum())
        scored += num_new
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll_sum / scored)


GPL3_PATH = Path("/usr/share/common-licenses/GPL-3")


def offline_english_text(max_chars: int = 2000, path=GPL3_PATH) -> str:
    """Plain English text available offline: the GNU GPL version 3, shipped by Debian/Ubuntu.

    Runs of spaces (the file is indented for display) are collapsed to one space and paragraphs
    are kept; the result is cut to ``max_chars`` characters.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing, so there is no offline English text to measure perplexity on. "
            f"Fix: install Debian's base-files package (`apt-get install base-files`), or pass "
            f"path= any long English plain-text file."
        )
    raw = path.read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", raw)]
    text = "\n\n".join(p for p in paragraphs if p)
    return text[:max_chars]
