"""Load the causal language models the course quantizes, online or offline.

`load_model` loads a model from the Hugging Face Hub or a local folder. When the Hub is out of reach
(no network, `HF_HUB_OFFLINE=1`, or `offline=True`) it loads the model the repository ships instead:
a small OPT trained on the Python documentation, in `data/opt-tiny-docs`, with opt-350m's module names.
`build_opt_350m` builds facebook/opt-350m's architecture with random weights, for footprints without a
download. Weights load from safetensors only; no access token is ever read or asked for.
"""

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM
from transformers.utils import logging as hf_logging

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
EMBEDDED_MODEL_DIR = DATA_DIR / "opt-tiny-docs"
HELD_OUT_TEXT = DATA_DIR / "text" / "python_tutorial.txt"
DEFAULT_MODEL_ID = "facebook/opt-350m"
HUB_ENDPOINT = "https://huggingface.co"


def _require(path, what):
    """Return `path`, or raise FileNotFoundError saying how to get it."""
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found at {path}. It ships with the course repository: install myq from a clone "
            f"(git clone, then pip install -e .), not from a copy of the package alone")
    return path


def held_out_text():
    """Return the evaluation text: the Python tutorial, which the embedded model never saw in training."""
    return _require(HELD_OUT_TEXT, "the held-out text").read_text(encoding="utf-8")


def hub_reachable(timeout=3.0):
    """Return whether a TCP connection to the Hugging Face Hub opens within `timeout` seconds."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", HUB_ENDPOINT))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline_requested(offline=None):
    """Return whether to skip the Hub: `offline` when given, else the HF_HUB_OFFLINE environment variable."""
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(model_id):
    """Return whether `model_id` names a local folder rather than a Hub id such as "owner/name"."""
    text = str(model_id)
    return (isinstance(model_id, os.PathLike) or Path(text).exists() or text.startswith((".", "/", "~"))
            or text.count("/") > 1 or "\\" in text)


@contextmanager
def _quiet_progress():
    """Hide transformers' "Loading weights" bar while inside, then restore the caller's setting."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_folder(folder, dtype):
    """Load the model and tokenizer saved in `folder` (a transformers folder with safetensors weights)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} not found; pass an existing folder or a Hub id such as '{DEFAULT_MODEL_ID}'")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"folder {folder} contains no model: config.json is missing")
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), tokenizer


def load_embedded_model(dtype=torch.bfloat16):
    """Return (model, tokenizer) of the small OPT shipped in `data/opt-tiny-docs`, in eval mode."""
    _require(EMBEDDED_MODEL_DIR / "config.json", "the embedded model")
    return _load_folder(EMBEDDED_MODEL_DIR, dtype)


def is_embedded_model(model):
    """Return whether `model` was loaded from the embedded model's folder."""
    name = getattr(model, "name_or_path", "") or ""
    return bool(name) and Path(name).resolve() == EMBEDDED_MODEL_DIR.resolve()


def _load_from_hub(model_id, dtype):
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except OSError as error:
        raise OSError(f"{model_id}: no such model on the Hugging Face Hub, or it has no safetensors weights "
                      f"or needs an access token (myq uses public models only). Check the id at "
                      f"{HUB_ENDPOINT}/{model_id}. Details: {error}") from error
    return model.eval(), tokenizer


def load_model(model_id=DEFAULT_MODEL_ID, dtype=torch.bfloat16, offline=None):
    """Return (model, tokenizer) in eval mode, from a Hub id or a local folder.

    A local folder is always loaded as is. For a Hub id, `offline=True`, HF_HUB_OFFLINE=1 or an
    unreachable Hub (checked in about 3 seconds) loads the embedded model instead and prints one line
    saying so; `offline=False` skips the check and goes to the Hub.
    """
    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id):
        raise TypeError(f"model_id must be a Hub id such as '{DEFAULT_MODEL_ID}' or a folder path, "
                        f"got {model_id!r}")
    if _looks_like_path(model_id):
        return _load_folder(model_id, dtype)
    if offline_requested(offline) or (offline is None and not hub_reachable()):
        reason = "offline mode" if offline_requested(offline) else "Hugging Face Hub not reachable"
        print(f"{reason}: using the embedded model data/opt-tiny-docs (a small OPT trained on the Python "
              f"docs). Connect to the internet to load {model_id}.")
        return load_embedded_model(dtype)
    return _load_from_hub(model_id, dtype)


def opt_350m_config():
    """Return facebook/opt-350m's configuration, written out so that no download is needed."""
    return OPTConfig(
        vocab_size=50272, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
        max_position_embeddings=2048,
        # opt-350m alone among the OPT sizes embeds tokens in 512 dimensions and projects them to 1024
        # (project_in / project_out), and normalizes after each block instead of before.
        word_embed_proj_dim=512, do_layer_norm_before=False, activation_function="relu",
        enable_bias=True, dropout=0.1, attention_dropout=0.0, layerdrop=0.0,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=True,
    )


def build_opt_350m(dtype=torch.bfloat16, seed=0):
    """Return an OPTForCausalLM with opt-350m's architecture and random weights, in eval mode.

    The weights are drawn from `seed` without touching the global random state. Building it takes a few
    seconds and about 0.7 GB in bfloat16.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # _from_config builds the tensors directly in `dtype`, so no float32 copy (1.3 GB) is made.
        model = OPTForCausalLM._from_config(opt_350m_config(), dtype=dtype)
    return model.eval()


def runtime_dtype():
    """Return (device, dtype, reason): where the notebooks run models, in which float dtype, and why.

    The dtype is bfloat16 on the CPU and on GPUs that compute in it natively (compute capability 8.0
    and up). Older GPUs, such as the T4 of Colab's free tier, get float16.
    """
    if not torch.cuda.is_available():
        return "cpu", torch.bfloat16, "no GPU: bfloat16 on the CPU"
    name = torch.cuda.get_device_name()
    # By default torch also reports bfloat16 as supported where it is only emulated (T4), which is slow.
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "cuda", torch.bfloat16, f"GPU {name}: bfloat16, which it supports natively"
    return "cuda", torch.float16, f"GPU {name}: float16, because it has no native bfloat16"
