"""The service tokenizes prompts off the event loop (inference_course.service.app.PromptTokenizer) and gets the
same token ids as the model's tokenizer called directly."""
import asyncio
import threading

import pytest

from inference_course.service.app import PromptTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    from inference_course.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model())


TEXTS = ["The capital of France is", "  leading spaces and trailing  ", "naïve café, 東京 and emoji 🙂",
         "<|im_start|>user\nspecial tokens written as text<|im_end|>", "", "line\n\nbreaks\tand tabs"]


def test_ids_match_the_tokenizer_called_directly(hf_tokenizer):
    tok = PromptTokenizer(hf_tokenizer)
    # the embedded model's tokenizer takes the fast path (a private Rust copy); without it the ids would
    # match trivially, through the tokenizer's own encode
    assert tok.backend is not None, type(hf_tokenizer).__mro__
    try:
        for text in TEXTS:
            for special in (True, False):
                got = asyncio.run(tok.encode(text, add_special_tokens=special))
                assert got == hf_tokenizer.encode(text, add_special_tokens=special), (text, special)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, 東京?"}]
        expected = hf_tokenizer.encode(hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True),
                                       add_special_tokens=False)
        assert asyncio.run(tok.encode_chat(messages)) == expected
        assert len(tok) == len(hf_tokenizer)
    finally:
        tok.close()


def test_tokenization_runs_in_one_worker_thread_not_on_the_event_loop(hf_tokenizer):
    tok = PromptTokenizer(hf_tokenizer)
    seen = []
    encode = tok._encode

    def recording(text, add_special_tokens):
        seen.append(threading.current_thread().name)
        return encode(text, add_special_tokens)

    tok._encode = recording

    async def many():
        loop_thread = threading.current_thread().name
        ids = await asyncio.gather(*(tok.encode(f"prompt number {i}") for i in range(8)),
                                   tok.encode_chat([{"role": "user", "content": "hello"}]))
        return loop_thread, ids

    try:
        loop_thread, ids = asyncio.run(many())
    finally:
        tok.close()
    assert len(seen) == 9 and all(ids)
    assert loop_thread not in seen, f"tokenized on the event loop's thread {loop_thread}"
    assert len(set(seen)) == 1 and seen[0].startswith("tokenize"), seen  # all on the one worker thread


def test_truncation_or_padding_saved_with_a_tokenizer_does_not_cut_prompts(hf_tokenizer):
    # transformers turns on the truncation/padding a tokenizer.json stores; encode() turns it off per call,
    # the Rust tokenizer would keep it. A fresh tokenizer with truncation on stands for such a model.
    from transformers import AutoTokenizer

    from inference_course.models import resolve_model

    fresh = AutoTokenizer.from_pretrained(resolve_model())
    fresh.backend_tokenizer.enable_truncation(max_length=3)
    fresh.backend_tokenizer.enable_padding(length=64)
    tok = PromptTokenizer(fresh)
    text = "a prompt of many more than three tokens, which must reach the engine whole"
    try:
        got = asyncio.run(tok.encode(text))
    finally:
        tok.close()
    assert got == hf_tokenizer.encode(text) and len(got) > 3, got


def test_split_special_tokens_is_kept_by_the_copy():
    # A tokenizer set to split special tokens written in the text encodes "<|im_start|>" as ordinary text; the
    # private copy must too (encode sets the flag on every call; the serialized tokenizer does not carry it).
    from transformers import AutoTokenizer

    from inference_course.models import resolve_model

    splitting = AutoTokenizer.from_pretrained(resolve_model(), split_special_tokens=True)
    tok = PromptTokenizer(splitting)
    text = "<|im_start|>user\nhello<|im_end|>"
    try:
        assert tok.backend is not None
        got = asyncio.run(tok.encode(text, add_special_tokens=False))
    finally:
        tok.close()
    assert got == splitting.encode(text, add_special_tokens=False)
    assert splitting.convert_tokens_to_ids("<|im_start|>") not in got, got


def test_a_tokenizer_with_its_own_encode_plus_uses_its_encode():
    from transformers import AutoTokenizer

    from inference_course.models import resolve_model

    custom = AutoTokenizer.from_pretrained(resolve_model())

    class CustomTokenizer(type(custom)):
        def _encode_plus(self, *args, **kwargs):  # does more than the Rust tokenizer: a copy would skip it
            return super()._encode_plus(*args, **kwargs)

    custom.__class__ = CustomTokenizer
    tok = PromptTokenizer(custom)
    try:
        assert tok.backend is None
        assert asyncio.run(tok.encode("hello there")) == custom.encode("hello there")
    finally:
        tok.close()
