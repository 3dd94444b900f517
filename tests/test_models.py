import re
import socket

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Tokenizer, OPTForCausalLM

import myq
from myq import models
from conftest import tiny_opt_config

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]


def save_tiny_model(folder):
    """Save a tiny OPT and a byte-level BPE tokenizer trained on a few lines into `folder`."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n" * 20], vocab_size=300, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(folder))
    tokenizer = GPT2Tokenizer.from_pretrained(str(folder), unk_token="<unk>", bos_token="</s>",
                                              eos_token="</s>", pad_token="<pad>", add_bos_token=True)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    OPTForCausalLM(tiny_opt_config()).to(torch.bfloat16).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-opt"))


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to open a connection."""
    def fail_on_connect(*args, **kwargs):
        raise AssertionError(f"a test opened a network connection to {args[:1]}")
    monkeypatch.setattr(socket, "create_connection", fail_on_connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_offline_flag_loads_embedded(no_network, capsys):
    model, tokenizer = myq.load_model(offline=True)
    assert myq.is_embedded_model(model)
    assert model.dtype == torch.bfloat16
    assert not model.training
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1
    assert "data/opt-tiny-docs" in printed[0]
    assert "Connect to the internet to load facebook/opt-350m." in printed[0]


def test_env_offline_loads_embedded(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = myq.load_model("facebook/opt-350m")
    assert myq.is_embedded_model(model)


def test_unreachable_hub_loads_embedded(no_network, monkeypatch, capsys):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    model, _ = myq.load_model("facebook/opt-350m")
    assert myq.is_embedded_model(model)
    assert capsys.readouterr().out.startswith("Hugging Face Hub not reachable: using the embedded model")


def test_reachable_hub_loads_from_hub(no_network, monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    calls = []
    monkeypatch.setattr(models, "_load_from_hub", lambda model_id, dtype: calls.append((model_id, dtype)))
    myq.load_model("facebook/opt-125m", dtype=torch.float32)
    assert calls == [("facebook/opt-125m", torch.float32)]


def test_unknown_hub_id_named(no_network, monkeypatch):
    def missing(*args, **kwargs):
        raise OSError("repository not found")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(OSError, match="facebook/opt-350mm: no such model on the Hugging Face Hub"):
        myq.load_model("facebook/opt-350mm", offline=False)


def test_missing_folder_named(tmp_path):
    folder = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"model folder {folder} not found")):
        myq.load_model(str(folder))


def test_folder_without_config_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="contains no model: config.json is missing"):
        myq.load_model(tmp_path)


def test_local_folder_never_falls_back(no_network, tiny_folder, capsys):
    model, tokenizer = myq.load_model(str(tiny_folder), offline=True)
    assert model.name_or_path == str(tiny_folder)
    assert model.config.hidden_size == tiny_opt_config().hidden_size
    assert tokenizer("def")["input_ids"][0] == 2
    assert capsys.readouterr().out == ""


def test_hub_check_fails_closed(monkeypatch):
    addresses = []

    def time_out(address, timeout):
        addresses.append((address, timeout))
        raise TimeoutError("timed out")
    monkeypatch.setattr(socket, "create_connection", time_out)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert myq.hub_reachable() is False
    assert addresses == [(("huggingface.co", 443), 3.0)]


def test_missing_data_says_clone(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "HELD_OUT_TEXT", tmp_path / "python_tutorial.txt")
    with pytest.raises(FileNotFoundError, match="install myq from a clone"):
        myq.held_out_text()


def test_embedded_model_layout():
    model, _ = myq.load_embedded_model()
    assert type(model) is OPTForCausalLM
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "project_in", "project_out"} <= {
        name.split(".")[-1] for name, _ in model.named_modules()}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.fixture(scope="module")
def opt_350m():
    """Build opt-350m's architecture once per module: (global RNG state unchanged, MB before, W8 model)."""
    rng_state = torch.random.get_rng_state()
    model = myq.build_opt_350m()
    rng_unchanged = torch.equal(rng_state, torch.random.get_rng_state())
    before = myq.footprint_mb(model)
    return rng_unchanged, before, myq.quantize_model(model)


def test_opt_350m_config_matches_hub():
    config = myq.opt_350m_config()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (50272, 1024, 24)
    assert (config.num_attention_heads, config.ffn_dim, config.max_position_embeddings) == (16, 4096, 2048)
    assert (config.word_embed_proj_dim, config.do_layer_norm_before) == (512, False)
    assert (config.activation_function, config.pad_token_id, config.bos_token_id) == ("relu", 1, 2)
    assert config.eos_token_id == 2
    assert config.tie_word_embeddings is True


def test_opt_350m_footprints(opt_350m):
    _, before, model = opt_350m
    assert round(before, 1) == 662.4
    assert round(myq.footprint_mb(model), 1) == 359.8


def test_opt_350m_w8_swap(opt_350m):
    rng_unchanged, _, model = opt_350m
    assert len(model.myq_config.replaced) == 146
    assert model.myq_config.skipped == ["lm_head"]
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert rng_unchanged
