import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import myq
from myq import cli
from myq.models import EMBEDDED_MODEL_DIR
from myq.serialization import FORMAT_VERSION, INDEX_FILE, QUANTIZATION_FILE, WEIGHTS_FILE, parse_size

SETTINGS = [(8, None), (8, 32), (4, None), (4, 32), (2, None), (2, 32)]
EMBEDDING = "model.decoder.embed_tokens.weight"
FC1 = "model.decoder.layers.0.fc1"


def logits(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    with torch.no_grad():
        return model(input_ids).logits


def weight_keys(folder):
    keys = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as file:
            keys.update(file.keys())
    return keys


@pytest.fixture
def word_tokenizer():
    words = ["<pad>", "</s>", "<unk>", "def", "return", "print", "(", ")", "x", "="]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def saved(tiny_opt, tmp_path):
    """A 4-bit group-wise tiny OPT saved to tmp_path/w4; returns (model, folder)."""
    myq.quantize_model(tiny_opt, bits=4, group_size=32)
    return tiny_opt, myq.save_quantized(tiny_opt, tmp_path / "w4")


def rewrite_weights(folder, change):
    """Apply `change` to the saved tensors dict and write it back to model.safetensors."""
    state = load_file(folder / WEIGHTS_FILE)
    change(state)
    save_file(state, folder / WEIGHTS_FILE, metadata={"format": "pt"})


@pytest.mark.parametrize("bits,group_size", SETTINGS)
def test_round_trip_logits_bit_exact(tiny_opt, tmp_path, bits, group_size):
    myq.quantize_model(tiny_opt, bits=bits, group_size=group_size)
    myq.save_quantized(tiny_opt, tmp_path)
    loaded, tokenizer = myq.load_quantized(tmp_path)
    assert tokenizer is None
    assert torch.equal(logits(loaded), logits(tiny_opt))
    before, after = tiny_opt.state_dict(), loaded.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name


def test_loaded_model_keeps_settings(saved):
    model, folder = saved
    loaded, _ = myq.load_quantized(folder)
    assert loaded.myq_config == model.myq_config
    assert not loaded.training
    fc1 = loaded.get_submodule(FC1)
    assert (fc1.bits, fc1.group_size, fc1.symmetric) == (4, 32, True)


def test_quantization_json_describes_settings(saved):
    model, folder = saved
    description = json.loads((folder / QUANTIZATION_FILE).read_text())
    assert description["format_version"] == FORMAT_VERSION
    assert (description["bits"], description["group_size"], description["symmetric"]) == (4, 32, True)
    assert description["quantized_modules"] == model.myq_config.replaced
    assert description["excluded_modules"] == ["lm_head"]
    assert description["dtype"] == "float32"
    assert "zero_point" not in description["packing"]


def test_tied_lm_head_saved_once(saved):
    _, folder = saved
    assert EMBEDDING in weight_keys(folder)
    assert "lm_head.weight" not in weight_keys(folder)
    description = json.loads((folder / QUANTIZATION_FILE).read_text())
    assert description["tied_weights"] == {"lm_head.weight": EMBEDDING}
    loaded, _ = myq.load_quantized(folder)
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight


def test_no_pickle_file_written(saved, word_tokenizer, tmp_path):
    model, _ = saved
    folder = myq.save_quantized(model, tmp_path / "with_tokenizer", tokenizer=word_tokenizer)
    names = {path.name for path in folder.iterdir()}
    assert {WEIGHTS_FILE, QUANTIZATION_FILE, "config.json", "tokenizer.json"} <= names
    assert [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))] == []


def test_tokenizer_round_trip(saved, word_tokenizer, tmp_path):
    model, _ = saved
    folder = myq.save_quantized(model, tmp_path / "with_tokenizer", tokenizer=word_tokenizer)
    _, tokenizer = myq.load_quantized(folder)
    text = "def x = print ( x )"
    assert tokenizer(text)["input_ids"] == word_tokenizer(text)["input_ids"]
    assert tokenizer.eos_token == "</s>"


def test_sharded_save_loads_back(saved, tmp_path):
    model, _ = saved
    folder = myq.save_quantized(model, tmp_path / "sharded", max_shard_size=100_000)
    shards = sorted(path.name for path in folder.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not (folder / WEIGHTS_FILE).exists()
    loaded, _ = myq.load_quantized(folder)
    assert torch.equal(logits(loaded), logits(model))


def test_resave_replaces_old_shards(saved, tmp_path):
    model, _ = saved
    folder = myq.save_quantized(model, tmp_path / "again", max_shard_size=100_000)
    myq.save_quantized(model, folder)
    assert sorted(path.name for path in folder.glob("*.safetensors")) == [WEIGHTS_FILE]
    assert not (folder / INDEX_FILE).exists()


def test_resaved_loaded_model_identical_bytes(saved, tmp_path):
    _, folder = saved
    loaded, _ = myq.load_quantized(folder)
    again = myq.save_quantized(loaded, tmp_path / "again")
    assert (again / WEIGHTS_FILE).read_bytes() == (folder / WEIGHTS_FILE).read_bytes()
    assert (again / QUANTIZATION_FILE).read_text() == (folder / QUANTIZATION_FILE).read_text()


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (2, 32)])
def test_disk_size_near_footprint(tiny_opt, tmp_path, bits, group_size):
    myq.quantize_model(tiny_opt, bits=bits, group_size=group_size)
    folder = myq.save_quantized(tiny_opt, tmp_path)
    on_disk = (folder / WEIGHTS_FILE).stat().st_size
    assert abs(on_disk / myq.footprint_bytes(tiny_opt) - 1) < 0.05


def test_load_converts_dtype(saved):
    model, folder = saved
    loaded, _ = myq.load_quantized(folder, dtype=torch.bfloat16)
    fc1, original = loaded.get_submodule(FC1), model.get_submodule(FC1)
    assert fc1.scale.dtype == torch.bfloat16
    assert loaded.model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(fc1.weight, original.weight)


def test_truncated_file_names_it(saved):
    _, folder = saved
    path = folder / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read.*truncated or corrupt"):
        myq.load_quantized(folder)


def test_corrupt_shard_names_it(saved, tmp_path):
    model, _ = saved
    folder = myq.save_quantized(model, tmp_path / "sharded", max_shard_size=100_000)
    second = sorted(folder.glob("model-*.safetensors"))[1]
    second.write_bytes(b"\x08\x00\x00")
    with pytest.raises(ValueError, match=rf"{second.name} cannot be read"):
        myq.load_quantized(folder)


def test_wrong_dtype_names_key(saved):
    _, folder = saved
    rewrite_weights(folder, lambda state: state.update({f"{FC1}.scale": state[f"{FC1}.scale"].double()}))
    with pytest.raises(ValueError, match=rf"{FC1}\.scale: expected float32 \(256, 4\).*found float64 \(256, 4\)"):
        myq.load_quantized(folder)


def test_wrong_shape_names_key(saved):
    _, folder = saved
    rewrite_weights(folder, lambda state: state.update({f"{FC1}.weight": state[f"{FC1}.weight"][:, :32].contiguous()}))
    with pytest.raises(ValueError, match=rf"{FC1}\.weight: expected uint8 \(256, 64\).*found uint8 \(256, 32\)"):
        myq.load_quantized(folder)


def test_missing_key_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda state: state.pop(f"{FC1}.scale"))
    with pytest.raises(ValueError, match=rf"missing key\(s\).*{FC1}\.scale"):
        myq.load_quantized(folder)


def test_unexpected_key_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda state: state.update({"model.decoder.extra": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*model\.decoder\.extra"):
        myq.load_quantized(folder)


def test_stored_tied_name_is_unexpected(saved):
    _, folder = saved
    rewrite_weights(folder, lambda state: state.update({"lm_head.weight": state[EMBEDDING].clone()}))
    with pytest.raises(ValueError, match=r"unexpected key lm_head\.weight.*tied to"):
        myq.load_quantized(folder)


def test_unknown_format_version_named(saved):
    _, folder = saved
    path = folder / QUANTIZATION_FILE
    path.write_text(path.read_text().replace('"format_version": 1', '"format_version": 99'))
    with pytest.raises(ValueError, match=r"format_version=99.*supported versions: 1"):
        myq.load_quantized(folder)


def test_folder_without_json_rejected(saved):
    _, folder = saved
    (folder / QUANTIZATION_FILE).unlink()
    with pytest.raises(ValueError, match="is not a myq folder"):
        myq.load_quantized(folder)


def test_pickle_only_folder_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model\.bin\).*can run any code"):
        myq.load_quantized(tmp_path)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder"):
        myq.load_quantized(tmp_path / "nowhere")


def test_offline_repo_id_not_cached(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"nobody/no-such-model.*local Hub cache \(offline\)"):
        myq.load_quantized("nobody/no-such-model")


def test_unquantized_model_not_saved(tiny_opt, tmp_path):
    with pytest.raises(ValueError, match="myq.quantize_model"):
        myq.save_quantized(tiny_opt, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,expected", [(1000, 1000), ("500MB", 500 * 10**6), ("1GiB", 2**30)])
def test_parse_size_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", [0, "2 parsecs", None, True])
def test_parse_size_rejects_bad_values(size):
    with pytest.raises(ValueError, match="max_shard_size="):
        parse_size(size)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "myq", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="the embedded model is not here")
def test_cli_quantize_save_then_generate(tmp_path):
    folder = tmp_path / "w4"
    quantized = run_cli("quantize", "--offline", "--bits", "4", "--group-size", "128", "--eval-chars", "200",
                        "--save", str(folder))
    assert quantized.returncode == 0, quantized.stderr
    generated = run_cli("generate", str(folder), "def add(a, b):", "--max-new-tokens", "8")
    assert generated.returncode == 0, generated.stderr
    model, tokenizer = myq.load_quantized(folder)
    assert generated.stdout == myq.generate(model, tokenizer, "def add(a, b):", max_new_tokens=8) + "\n"
    assert (folder / "tokenizer_config.json").is_file()


def test_cli_generate_missing_folder(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path / "nowhere"), "hello"]) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1
    assert "no folder" in message


def test_cli_generate_without_tokenizer(saved, capsys):
    _, folder = saved
    assert cli.main(["generate", str(folder), "hello"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_bf16_round_trip_after_kernel_calls(tiny_opt, tmp_path):
    """Decoding on CPU may move 4-bit weights to a kernel layout; the saved bytes stay portable."""
    model = myq.quantize_model(tiny_opt.to(torch.bfloat16), bits=4, group_size=32)
    input_ids = torch.arange(3, 11)[None]  # 8 rows: short enough for the CPU kernels
    with torch.no_grad():
        expected = model(input_ids).logits
    folder = myq.save_quantized(model, tmp_path)
    loaded, _ = myq.load_quantized(folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    saved_codes = load_file(folder / WEIGHTS_FILE)[f"{FC1}.weight"]
    assert torch.equal(saved_codes, myq.pack(model.get_submodule(FC1).int_weight(), 4))


def test_llama_round_trip_with_rotary_buffers(tmp_path):
    """Llama keeps its rotary frequencies out of the state_dict, so they must be rebuilt, not loaded."""
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = myq.quantize_model(LlamaForCausalLM(config).eval(), bits=4, group_size=32)
    loaded, _ = myq.load_quantized(myq.save_quantized(model, tmp_path))
    assert torch.equal(logits(loaded), logits(model))
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
