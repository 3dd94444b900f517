"""Save a quantized model to a folder you can share on the Hugging Face Hub, and load it back exactly.

A saved folder holds:
    model.safetensors         the quantized state_dict, or model-0000i-of-0000n.safetensors shards listed in
                              model.safetensors.index.json when it is larger than `max_shard_size`
    myq_quantization.json     how it was quantized: bits, group size, symmetry, packing layout, the modules
                              quantized and excluded, and the names of tied (shared) tensors
    config.json               the transformers model config, to rebuild the architecture
    tokenizer files           when a tokenizer was given

Shapes follow `myq.layers`: N = out_features, K = in_features, G = K / S groups of S = group_size.
A tied tensor (lm_head sharing the embedding) is stored once, under its first name. Loading builds the
architecture on the meta device, swaps in empty quantized layers (`quantized=False`), checks every key,
shape and dtype read from the files before assigning anything, and never reads pickle files.
Left out: partial loads, and formats of other quantization tools (GPTQ, AWQ, bitsandbytes).
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .layers import QuantizedLinear, QuantizedLinearLayer
from .models import hub_reachable, offline_requested
from .quant import SUPPORTED_BITS
from .swap import QuantizationConfig, replace_linear_with_target

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
QUANTIZATION_FILE = "myq_quantization.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILE_NAME = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
LAYER_CLASSES = {cls.__name__: cls for cls in (QuantizedLinearLayer, QuantizedLinear)}
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# ---------------------------------------------------------------------------------------------- saving

def save_quantized(model, directory, tokenizer=None, max_shard_size="2GB"):
    """Write `model` (quantized by `myq.quantize_model`) and `tokenizer` to `directory`; return its Path.

    The folder is ready to upload to the Hub as it is. Weights larger than `max_shard_size` (bytes, or a
    string such as "500MB") are split into several safetensors files with an index.
    """
    description = quantization_description(model)
    state, tied = portable_state_dict(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_old_weight_files(directory)
    _write_weights(state, directory, parse_size(max_shard_size))
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    description["tied_weights"] = tied
    (directory / QUANTIZATION_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def quantization_description(model):
    """Return the contents of myq_quantization.json for a model quantized by `myq.quantize_model`."""
    config = getattr(model, "myq_config", None)
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"model ({type(model).__name__}) has no myq_config, so it was not quantized by "
                         f"myq.quantize_model; quantize it first, e.g. myq.quantize_model(model, bits=4)")
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"model must be a transformers model with a .config, got {type(model).__name__}")
    first = model.get_submodule(config.replaced[0])
    return {
        "format": "myq",
        "format_version": FORMAT_VERSION,
        "bits": config.bits,
        "group_size": config.group_size,
        "symmetric": config.symmetric,
        "layer_class": type(first).__name__,
        "dtype": str(model.dtype).removeprefix("torch."),
        "packing": packing_layout(config.bits, config.group_size, config.symmetric),
        "quantized_modules": list(config.replaced),
        "excluded_modules": list(config.skipped),
    }


def packing_layout(bits, group_size, symmetric):
    """Describe in words how each quantized layer's tensors are laid out, for readers of the JSON."""
    codes = ("int8 codes (N, K)" if bits == 8 else
             f"uint8 (N, ceil(K * {bits} / 8)): {8 // bits} codes per byte along K, first code in the low "
             f"bits, each stored as code + {2 ** (bits - 1)}")
    scale = "(N,) one per output channel" if group_size is None else \
        f"(N, G) one per group of {group_size} consecutive inputs, G = K / {group_size}"
    layout = {"weight": codes, "scale": scale + ", in the model dtype (float32 for float16 models)",
              "bias": "(N,) in the model dtype, when the layer has one",
              "dequantize": "w_dq = w_q * scale" if symmetric else "w_dq = (w_q - zero_point) * scale"}
    if not symmetric:
        layout["zero_point"] = "int8 codes, the shape of scale"
    return layout


def portable_state_dict(model):
    """Return (state, tied): CPU tensors to save, each storage once, and {dropped name: stored name}."""
    state, tied, name_by_identity = {}, {}, {}
    for name, tensor in model.state_dict().items():
        if tensor.is_meta:
            raise ValueError(f"{name} is on the meta device and has no values; load the weights before saving")
        identity = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if identity in name_by_identity:
            tied[name] = name_by_identity[identity]
            continue
        name_by_identity[identity] = name
        state[name] = tensor.detach()
    return _unshare_views(state), tied


def _unshare_views(state):
    """Copy tensors that are different views of one storage: safetensors rejects shared storage."""
    owners = {}
    for name, tensor in state.items():
        owners.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append(name)
    shared = {name for names in owners.values() if len(names) > 1 for name in names}
    return {name: (t.clone() if name in shared else t).cpu().contiguous() for name, t in state.items()}


def parse_size(size):
    """Return `size` in bytes: an int, or a string like "500MB", "2GB" or "1GiB"."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if isinstance(size, str) and match:
        return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])
    raise ValueError(f"max_shard_size={size!r} is not a size; use a positive number of bytes or a string "
                     f"such as '500MB', '2GB' or '1GiB'")


def split_into_shards(state, max_bytes):
    """Split `state` in order into dicts of at most `max_bytes` each (a larger tensor gets its own)."""
    shards, current, current_bytes = [], {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor
        current_bytes += size
    return shards + [current] if current else shards


def _write_weights(state, directory, max_bytes):
    """Write one model.safetensors, or numbered shards and their index when `state` is too large."""
    shards = split_into_shards(state, max_bytes)
    if len(shards) <= 1:
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _remove_old_weight_files(directory):
    """Delete weight files of an earlier save, so a folder never mixes shards of two models."""
    for path in directory.iterdir():
        if path.is_file() and (WEIGHT_FILE_NAME.match(path.name) or path.name == INDEX_FILE):
            path.unlink()


# --------------------------------------------------------------------------------------------- loading

def load_quantized(directory, dtype=None, offline=None):
    """Return (model, tokenizer) from a folder written by `save_quantized`, or from a Hub repo id that contains one.

    The model is rebuilt without float weights and loaded strictly; its logits equal the saved model's
    bit for bit. `dtype` (default: the saved one) converts the float tensors after loading. `tokenizer`
    is None when the folder has none. A repo id is looked up in the local cache only when `offline=True`,
    HF_HUB_OFFLINE=1 or the Hub is unreachable. Nothing is returned when any check fails.
    """
    folder = resolve_folder(directory, offline)
    description = read_description(folder)
    state = read_weights(folder)
    config = AutoConfig.from_pretrained(folder)
    saved_dtype = _dtype_named(description["dtype"], f"{QUANTIZATION_FILE} 'dtype'")
    model = build_skeleton(config, description, saved_dtype)
    state = _with_tied_names(state, description["tied_weights"])
    check_state(model, state)
    if dtype is not None and dtype != saved_dtype:
        model = build_skeleton(config, description, _check_dtype(dtype))
        state = _cast_floats(state, model)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    _check_nothing_on_meta(model)
    model.myq_config = QuantizationConfig(description["bits"], description["group_size"],
                                          description["symmetric"], list(description["quantized_modules"]),
                                          list(description["excluded_modules"]))
    return model.eval(), _load_tokenizer(folder)


def resolve_folder(directory, offline=None):
    """Return the local folder for `directory`: itself, or a Hub snapshot when it is an "owner/name" id."""
    if not isinstance(directory, (str, Path)) or not str(directory):
        raise TypeError(f"directory must be a folder path or a Hub repo id such as 'owner/name', "
                        f"got {directory!r}")
    path = Path(directory).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{directory} is a file; pass the folder that save_quantized wrote")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(directory)):
        raise FileNotFoundError(f"no folder {directory}; pass a folder written by myq.save_quantized "
                                f"or a Hub repo id such as 'owner/name'")
    return _download(str(directory), offline)


def _download(repo_id, offline):
    """Fetch the JSON, safetensors and tokenizer files of `repo_id`, from the cache alone when offline."""
    from huggingface_hub import snapshot_download

    cache_only = offline_requested(offline) or (offline is None and not hub_reachable())
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=cache_only))
    except (OSError, ValueError) as error:
        where = "the local Hub cache (offline)" if cache_only else "the Hugging Face Hub"
        raise FileNotFoundError(f"{repo_id} is not a local folder and could not be found in {where}: "
                                f"{type(error).__name__}: {error}") from error


def read_description(folder):
    """Return the checked contents of myq_quantization.json in `folder`."""
    path = folder / QUANTIZATION_FILE
    if not path.is_file():
        _reject_pickle_only(folder)
        raise ValueError(f"{folder} is not a myq folder: it has no {QUANTIZATION_FILE}. Save quantized models "
                         f"with myq.save_quantized; load float checkpoints with myq.load_model")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{QUANTIZATION_FILE} is not valid JSON ({error}); save the model again") from error
    check_description(description)
    return description


def check_description(description):
    """Raise ValueError naming the first field of myq_quantization.json that myq cannot use."""
    version = description.get("format_version") if isinstance(description, dict) else None
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(f"{QUANTIZATION_FILE} has format_version={version!r}, which this myq cannot read; "
                         f"supported versions: {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. "
                         f"Upgrade myq, or save the model again with this version")
    expected = {"bits": int, "symmetric": bool, "layer_class": str, "dtype": str, "quantized_modules": list,
                "excluded_modules": list, "tied_weights": dict}
    for key, kind in expected.items():
        if not isinstance(description.get(key), kind):
            raise ValueError(f"{QUANTIZATION_FILE}: '{key}' must be a {kind.__name__}, "
                             f"got {description.get(key)!r}")
    if description["bits"] not in SUPPORTED_BITS:
        raise ValueError(f"{QUANTIZATION_FILE}: bits={description['bits']} is not one of {SUPPORTED_BITS}")
    if description["layer_class"] not in LAYER_CLASSES:
        raise ValueError(f"{QUANTIZATION_FILE}: layer_class={description['layer_class']!r} is not one of "
                         f"{sorted(LAYER_CLASSES)}")


def _reject_pickle_only(folder):
    """Raise ValueError when `folder` contains pickle weights and no safetensors: myq never unpickles."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} contains only pickle weights ({', '.join(pickles)}). myq loads safetensors "
                         f"only: unpickling a file can run any code it contains. Ask for a safetensors "
                         f"copy, or save the model with myq.save_quantized")


def weight_files(folder):
    """Return the safetensors files of `folder`: the shards named by the index, or model.safetensors."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{INDEX_FILE} is not a safetensors index ({error!r}); save the model again") \
                from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        files = [folder / WEIGHTS_FILE]
    for path in files:
        if not path.is_file():
            _reject_pickle_only(folder)
            raise FileNotFoundError(f"weight file {path.name} is missing from {folder}")
    return files


def read_weights(folder):
    """Return {name: tensor} from every safetensors file of `folder`, naming a file that cannot be read."""
    state = {}
    for path in weight_files(folder):
        try:
            with safe_open(path, framework="pt") as file:
                for name in file.keys():
                    if name in state:
                        raise ValueError(f"{name} is stored twice: in {path.name} and in an earlier shard")
                    state[name] = file.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path.name} cannot be read as safetensors, it is truncated or corrupt "
                             f"({error}); save or download it again") from error
    return state


def build_skeleton(config, description, dtype):
    """Return the architecture of `config` without weight values, with empty quantized layers swapped in."""
    model = empty_architecture(config, dtype)
    layer_class = LAYER_CLASSES[description["layer_class"]]
    kwargs = {} if layer_class is QuantizedLinearLayer else {
        "bits": description["bits"], "group_size": description["group_size"],
        "symmetric": description["symmetric"]}
    report = replace_linear_with_target(model, layer_class, exclude=tuple(description["excluded_modules"]),
                                        quantized=False, **kwargs)
    if sorted(report.replaced) != sorted(description["quantized_modules"]):
        differ = sorted(set(report.replaced) ^ set(description["quantized_modules"]))
        raise ValueError(f"{QUANTIZATION_FILE} lists other quantized modules than config.json builds; "
                         f"they differ in: {', '.join(differ[:5])}")
    return model


def empty_architecture(config, dtype):
    """Return the model of `config` on the meta device, or on the CPU when it has non-persistent buffers.

    Tensors on the meta device have a shape and dtype but no memory, so no float weight is allocated
    only to be replaced. Buffers kept out of the state_dict (such as Llama's rotary frequencies) are
    computed when the model is built and are not in the files, so such a model is built on the CPU.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if set(dict(model.named_buffers())) <= set(model.state_dict()):
        return model
    # NOTE: this route allocates the float weights until load_state_dict replaces them, so loading
    # briefly needs the float model's memory.
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _with_tied_names(state, tied):
    """Return `state` with each dropped tied name pointing at the tensor it shares."""
    state = dict(state)
    for name, stored_name in tied.items():
        if name in state:
            raise ValueError(f"unexpected key {name}: {QUANTIZATION_FILE} lists it as tied to {stored_name}, "
                             f"so the weight files must not contain it")
        if stored_name not in state:
            raise ValueError(f"missing key {stored_name} (the tensor that {name} is tied to)")
        state[name] = state[stored_name]
    return state


def check_state(model, state):
    """Raise ValueError unless `state` has exactly the keys, shapes and dtypes of `model`'s state_dict."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing:
        raise ValueError(f"missing key(s) in the weight files: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if unexpected:
        raise ValueError(f"unexpected key(s) in the weight files: {', '.join(unexpected[:5])}"
                         f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all)")
    for name, want in expected.items():
        found = state[name]
        if found.shape != want.shape or found.dtype != want.dtype:
            raise ValueError(f"{name}: expected {str(want.dtype).removeprefix('torch.')} "
                             f"{tuple(want.shape)} for the saved quantization settings, found "
                             f"{str(found.dtype).removeprefix('torch.')} {tuple(found.shape)}")


def _dtype_named(name, where):
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{where} is {name!r}, not a floating-point torch dtype such as 'bfloat16'")
    return dtype


def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def _cast_floats(state, model):
    """Return `state` with each float tensor in the dtype `model` expects for it (integers untouched)."""
    expected = model.state_dict()
    return {name: t.to(expected[name].dtype) if t.is_floating_point() else t for name, t in state.items()}


def _check_nothing_on_meta(model):
    """Raise ValueError when a tensor of `model` got no values from the files (it is still on meta)."""
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{type(model).__name__}: {', '.join(left[:3])} got no values from the weight files "
                         f"(still on the meta device); load_quantized cannot rebuild this model")


def _load_tokenizer(folder):
    """Return the tokenizer saved in `folder`, or None when there is none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(folder)
