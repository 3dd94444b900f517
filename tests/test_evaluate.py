import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import myq
from myq import evaluate

VOCAB = 260  # 256 byte values shifted by 4 special ids
BOS = 2
TEXT = "Lists are mutable; tuples are not. " * 12  # 420 bytes, 421 tokens with BOS


class ByteTokenizer:
    """One token per UTF-8 byte (id = byte + 4), with BOS prepended, as OPT's tokenizer does."""
    bos_token_id = BOS

    def __call__(self, text, return_tensors=None, verbose=True):
        ids = [BOS] + [byte + 4 for byte in text.encode("utf-8")]
        return {"input_ids": torch.tensor([ids])}


class FixedLogitsModel(nn.Module):
    """Predict the same logits at every position; records the windows it is given."""

    def __init__(self, logits, max_position_embeddings=64):
        super().__init__()
        self.register_buffer("logits", logits)
        self.config = SimpleNamespace(max_position_embeddings=max_position_embeddings)
        self.windows = []

    def forward(self, input_ids):
        self.windows.extend(input_ids.tolist())
        batch, tokens = input_ids.shape
        return SimpleNamespace(logits=self.logits.expand(batch, tokens, -1))


@pytest.fixture(scope="module")
def embedded():
    return myq.load_embedded_model()


def test_uniform_model_perplexity_is_vocab():
    model = FixedLogitsModel(torch.zeros(VOCAB))
    assert myq.perplexity(model, ByteTokenizer(), TEXT) == pytest.approx(VOCAB, rel=1e-6)


def test_uniform_model_bits_per_byte():
    model = FixedLogitsModel(torch.zeros(VOCAB))
    assert myq.bits_per_byte(model, ByteTokenizer(), TEXT) == pytest.approx(math.log2(VOCAB), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, None])
@pytest.mark.parametrize("context_length, stride", [(64, 32), (64, 1), (17, 16), (64, 63), (8, 3)])
def test_every_token_scored_once(context_length, stride, batch_size):
    # Distinct log-probabilities per token id: a token scored twice or skipped changes the sum.
    logits = torch.linspace(-3.0, 3.0, VOCAB)
    model = FixedLogitsModel(logits)
    ids = ByteTokenizer()(TEXT)["input_ids"][0]
    log_probs = torch.log_softmax(logits, dim=0)
    expected = -log_probs[ids[1:]].double().sum().item()

    nll_sum, n_tokens = myq.negative_log_likelihood(model, ByteTokenizer(), TEXT, context_length, stride,
                                                    batch_size=batch_size)
    assert n_tokens == len(ids) - 1
    assert nll_sum == pytest.approx(expected, rel=1e-5)


def test_window_spans_tile_text():
    spans = list(evaluate.window_spans(421, context_length=64, stride=32))
    scored = [i for _, end, first in spans for i in range(first, end)]
    assert scored == list(range(1, 421))
    assert all(end - begin <= 64 for begin, end, _ in spans)
    # Every window after the first scores only tokens with at least context - stride of left context.
    assert all(first - begin >= 32 for begin, _, first in spans[1:])


def test_batches_stack_equal_windows():
    spans = list(evaluate.window_spans(100, context_length=40, stride=20))
    batches = list(evaluate.batched_spans(spans, batch_size=2))
    assert batches == [[(0, 40, 1), (20, 60, 40)], [(40, 80, 60), (60, 100, 80)]]
    short = list(evaluate.batched_spans(evaluate.window_spans(90, 40, 20), batch_size=8))
    assert [len(batch) for batch in short] == [3, 1]


def test_default_window_is_full_context():
    model = FixedLogitsModel(torch.zeros(VOCAB), max_position_embeddings=64)
    myq.perplexity(model, ByteTokenizer(), TEXT)
    assert [len(w) for w in model.windows[:2]] == [64, 64]
    assert model.windows[1][0] == ByteTokenizer()(TEXT)["input_ids"][0, 32].item()


@pytest.mark.parametrize("context_length, stride, message", [
    (65, None, "context_length=65 must be between 2"), (1, None, "context_length=1 must be between 2"),
    (64, 64, "stride=64 must be between 1 and"), (64, 0, "stride=0 must be between 1 and")])
def test_bad_window_rejected(context_length, stride, message):
    model = FixedLogitsModel(torch.zeros(VOCAB), max_position_embeddings=64)
    with pytest.raises(ValueError, match=message):
        myq.perplexity(model, ByteTokenizer(), TEXT, context_length, stride)


def test_empty_text_rejected():
    with pytest.raises(ValueError, match="text must be a non-empty str"):
        myq.perplexity(FixedLogitsModel(torch.zeros(VOCAB)), ByteTokenizer(), "")


def test_token_ids_start_with_bos(embedded):
    _, tokenizer = embedded
    ids = evaluate.token_ids(tokenizer, "Lists are mutable.")
    assert ids[0].item() == tokenizer.bos_token_id
    assert ids[1].item() != tokenizer.bos_token_id


def test_generate_greedy_new_text_only(embedded):
    model, tokenizer = embedded
    first = myq.generate(model, tokenizer, myq.EMBEDDED_PROMPT, max_new_tokens=12)
    inputs = tokenizer(myq.EMBEDDED_PROMPT, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    prompt_length = inputs["input_ids"].shape[1]
    assert first == tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    assert first == myq.generate(model, tokenizer, myq.EMBEDDED_PROMPT, max_new_tokens=12)


def test_decode_speed_generates_exact_count(embedded, monkeypatch):
    model, tokenizer = embedded
    counts = []
    original = model.generate

    def counting_generate(**kwargs):
        output = original(**kwargs)
        counts.append(output.shape[1] - kwargs["input_ids"].shape[1])
        return output
    monkeypatch.setattr(model, "generate", counting_generate)
    speed = myq.decode_tokens_per_second(model, tokenizer, myq.EMBEDDED_PROMPT, new_tokens=5, warmup=1, repeats=2)
    assert counts == [5, 5, 5]
    assert speed > 0


def test_default_prompt_per_model(embedded, tiny_opt):
    assert myq.default_prompt(embedded[0]) == "The return value is"
    assert myq.default_prompt(tiny_opt) == "Malaysia is a beautiful country and"


def test_w8_perplexity_within_one_percent():
    model, tokenizer = myq.load_embedded_model()
    text = myq.held_out_text()[:40_000]
    before = myq.perplexity(model, tokenizer, text)
    after = myq.perplexity(myq.quantize_model(model), tokenizer, text)
    assert abs(after / before - 1) < 0.01
