"""Measure a causal language model before and after quantization: perplexity, bits per byte, samples, speed.

Perplexity uses a sliding window over the model's context: windows of `context_length` tokens advance by
`stride`. Each window scores only the tokens no earlier window scored, so every token after the leading
BOS is scored exactly once. Once the text is long enough, each has at least `context_length - stride`
tokens of left context. Shapes: B/T = batch/tokens (windows are (1, T)).
Left out: batching windows together, and any dataset download (the text is passed in as a string).
"""

import itertools
import math
import time

import torch
import torch.nn.functional as F

from .models import is_embedded_model

# The same prompt before and after quantization makes the two samples comparable. The embedded model
# gets a sentence to finish: after a full stop it tends to write reStructuredText markup and loop.
OPT_350M_PROMPT = "Malaysia is a beautiful country and"
EMBEDDED_PROMPT = "The return value is"

# Tokens per forward pass when scoring: 16 windows of the embedded model, 2 of opt-350m. The float32
# logits of a batch take BATCH_TOKENS * vocab_size * 4 bytes (about 0.8 GB for opt-350m).
BATCH_TOKENS = 4096


def default_prompt(model):
    """Return the course's prompt for `model`: documentation prose for the embedded model."""
    return EMBEDDED_PROMPT if is_embedded_model(model) else OPT_350M_PROMPT


def _device(model):
    """Return the device of the model's first parameter or buffer (a quantized layer has only buffers)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def token_ids(tokenizer, text):
    """Return the token ids (T,) of `text`, starting with the tokenizer's BOS token."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {type(text).__name__} {text!r:.40}")
    # verbose=False because a long text exceeds model_max_length on purpose: the windows handle it.
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    bos = tokenizer.bos_token_id
    if bos is not None and (len(ids) == 0 or ids[0] != bos):
        ids = torch.cat([torch.tensor([bos]), ids])
    return ids


def _window_settings(model, context_length, stride):
    """Return (context_length, stride) with the defaults filled in, or raise ValueError."""
    limit = model.config.max_position_embeddings
    context_length = limit if context_length is None else context_length
    if not 2 <= context_length <= limit:
        raise ValueError(f"context_length={context_length} must be between 2 and the model's "
                         f"max_position_embeddings={limit}")
    stride = context_length // 2 if stride is None else stride
    if not 1 <= stride <= context_length - 1:
        raise ValueError(f"stride={stride} must be between 1 and context_length - 1 = {context_length - 1}")
    return context_length, stride


def window_spans(n_tokens, context_length, stride):
    """Yield (begin, end, first_scored) for each window over `n_tokens` ids.

    The window is ids[begin:end]. It scores the tokens first_scored..end-1, each predicted from the
    tokens before it in the window, so the scored ranges tile 1..n_tokens-1 without overlap.
    """
    begin, scored_up_to = 0, 1
    while scored_up_to < n_tokens:
        end = min(begin + context_length, n_tokens)
        yield begin, end, scored_up_to
        scored_up_to = end
        begin += stride


def batched_spans(spans, batch_size):
    """Group consecutive window spans of equal length into lists of at most `batch_size`.

    Only the last window can be shorter than the others, so every batch stacks into a (B, T) tensor
    without padding.
    """
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def _batch_size(batch_size, context_length):
    """Return `batch_size`, or by default as many windows as fit in BATCH_TOKENS tokens."""
    if batch_size is None:
        return max(1, BATCH_TOKENS // context_length)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (windows per forward pass) or None")
    return batch_size


@torch.inference_mode()
def negative_log_likelihood(model, tokenizer, text, context_length=None, stride=None, progress=False,
                            batch_size=None):
    """Return (nll_sum, n_tokens): total negative log-likelihood in nats and the number of tokens scored.

    `batch_size` windows go through the model in one forward pass (default: as many as fit in
    BATCH_TOKENS tokens). With batch_size=1 the sum is the plain one-window-at-a-time loop.
    """
    context_length, stride = _window_settings(model, context_length, stride)
    batch_size = _batch_size(batch_size, context_length)
    ids = token_ids(tokenizer, text).to(_device(model))
    if len(ids) < 2:
        raise ValueError(f"text {text!r:.40} has no token to score after the BOS token")
    batches = list(batched_spans(window_spans(len(ids), context_length, stride), batch_size))
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="perplexity", unit="batch")
    nll_sum, n_tokens = 0.0, 0
    for batch in batches:
        windows = torch.stack([ids[begin:end] for begin, end, _ in batch])  # (B, T)
        logits = model(input_ids=windows).logits[:, :-1].float()  # (B, T - 1, vocab): row i predicts token i + 1
        for row, (begin, end, first) in enumerate(batch):
            nll = F.cross_entropy(logits[row, first - begin - 1:], windows[row, first - begin:], reduction="sum")
            nll_sum += nll.item()
            n_tokens += end - first
    return nll_sum, n_tokens


def perplexity_from_nll(nll_sum, n_tokens):
    """Return exp(nll_sum / n_tokens), the perplexity of a `negative_log_likelihood` result."""
    return math.exp(nll_sum / n_tokens)


def bits_per_byte_from_nll(nll_sum, text):
    """Return nll_sum (nats) in bits per UTF-8 byte of `text`."""
    return nll_sum / math.log(2) / len(text.encode("utf-8"))


def perplexity(model, tokenizer, text, context_length=None, stride=None, progress=False, batch_size=None):
    """Return the token perplexity exp(mean NLL) of `text` under `model`, by sliding window."""
    nll_sum, n_tokens = negative_log_likelihood(model, tokenizer, text, context_length, stride, progress, batch_size)
    return perplexity_from_nll(nll_sum, n_tokens)


def bits_per_byte(model, tokenizer, text, context_length=None, stride=None, progress=False, batch_size=None):
    """Return the NLL of `text` in bits per UTF-8 byte: comparable across tokenizers and with compressors."""
    nll_sum, _ = negative_log_likelihood(model, tokenizer, text, context_length, stride, progress, batch_size)
    return bits_per_byte_from_nll(nll_sum, text)


def _greedy(model, tokenizer, prompt, new_tokens, exact):
    """Return the output ids (1, T) of a greedy decode; `exact` forces exactly `new_tokens` new tokens."""
    inputs = tokenizer(prompt, return_tensors="pt").to(_device(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Passing every setting explicitly keeps generate() from warning about defaults.
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, num_beams=1,
                    temperature=None, top_p=None, top_k=None)
    if exact:
        settings["min_new_tokens"] = new_tokens
    with torch.inference_mode():
        return model.generate(**inputs, **settings), inputs["input_ids"].shape[1]


def generate(model, tokenizer, prompt, max_new_tokens=30):
    """Return the greedy continuation of `prompt` (the new text only), deterministic for a given model."""
    output, prompt_length = _greedy(model, tokenizer, prompt, max_new_tokens, exact=False)
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)


def _synchronize(model):
    if _device(model).type == "cuda":
        torch.cuda.synchronize()


def decode_tokens_per_second(model, tokenizer, prompt, new_tokens=32, warmup=1, repeats=3):
    """Return greedy decode speed in new tokens per second: the fastest of `repeats` timed runs.

    `warmup` untimed runs come first. Exactly `new_tokens` tokens are generated every time (end-of-text
    is suppressed), so runs before and after quantization do the same work. The fastest run is the one
    least disturbed by other work on the machine.
    """
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int, for example 32 tokens or 3 repeats")
    for _ in range(warmup):
        _greedy(model, tokenizer, prompt, new_tokens, exact=True)
    seconds = []
    for _ in range(repeats):
        _synchronize(model)
        start = time.perf_counter()
        _greedy(model, tokenizer, prompt, new_tokens, exact=True)
        _synchronize(model)
        seconds.append(time.perf_counter() - start)
    return new_tokens / min(seconds)
