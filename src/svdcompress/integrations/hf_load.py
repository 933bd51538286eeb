"""The one place svdcompress reads a Hugging Face directory, strictly.

transformers' loaders are lenient where a compression tool must not be: they run a model
directory's own Python code after a prompt (``auto_map``), initialise missing tensors at
random and drop unexpected ones with a log line, build a 5-token tokenizer for a directory
that has none, and fail with several lines of hub advice. Every svdcompress entry point
(``compress --hf``, ``load`` of a run, ``info``, ``eval-lm``, ``eval-embeddings``, teachers)
goes through the functions here instead:

- no code from a model directory ever runs (``trust_remote_code=False``, never a prompt);
  a directory that needs its own code is refused, one whose custom class has a built-in
  equivalent is loaded as that with a warning;
- every tensor of the model comes from the file: a missing, unexpected or wrongly shaped
  tensor is refused by name;
- a tokenizer is the directory's own, or absent, never an empty stand-in; a corrupt one is
  reported as corrupt;
- errors are one line of ours (``--debug`` shows transformers' own).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch

from ..core.errors import ConfigError, FormatError, MissingDependency, require

# Files a tokenizer's vocabulary lives in (one of them must be present).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")
# The config fields that fix a transformer's shapes and vocabulary (reference checks).
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "max_position_embeddings")


def transformers_lib():
    transformers = require("transformers", extra="hf")
    transformers.logging.set_verbosity_error()  # its load-time chatter is not for our users
    transformers.utils.logging.disable_progress_bar()  # svdcompress shows its own progress
    return transformers


def one_line(err: BaseException) -> str:
    """The first non-empty line of a foreign error's message (the rest is for --debug)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise FormatError(f"{path} is not valid JSON: {one_line(err)}") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return value


def locate(path: str | Path, *, run: bool = False) -> Path:
    """``path`` as a model directory with a config.json (``run``: an svdcompress run; else a
    run given where a dense model is expected is refused)."""
    path = Path(path)
    if not path.is_dir():
        raise FormatError(f"not a Hugging Face model directory (no such directory): {path}")
    if not run and (path / "svdcompress.json").is_file():
        raise FormatError(f"{path} is a compressed svdcompress run, not a dense Hugging Face model "
                          "directory: give the model it was compressed from")
    if not (path / "config.json").is_file():
        raise FormatError(f"not a Hugging Face model directory (no config.json): {path}")
    return path


def read_hf_config(path: str | Path, *, run: bool = False) -> dict:
    """The directory's config.json as a dict, after the checks that come before any loader:
    it exists, it is a JSON object, it needs no code of its own. What it asks that
    svdcompress will not do (custom classes) is said by ``custom_code`` once it loaded."""
    path = locate(path, run=run)
    config = read_json_object(path / "config.json")
    tf = transformers_lib()
    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in tf.CONFIG_MAPPING
    if config.get("auto_map") and not known:
        raise FormatError(f"{path / 'config.json'} needs its own Python code (auto_map, no built-in "
                          "model_type): svdcompress never runs code from a model directory")
    if model_type is not None and not known:
        raise FormatError(f"{path / 'config.json'} has model_type {model_type!r}, which "
                          f"transformers {tf.__version__} does not know")
    architectures = config.get("architectures")
    if architectures is not None and not (isinstance(architectures, list) and
                                          all(isinstance(a, str) for a in architectures)):
        raise FormatError(f"{path / 'config.json'}: 'architectures' must be a list of class names")
    if (path / "tokenizer_config.json").is_file():
        read_json_object(path / "tokenizer_config.json")
    return config


def custom_code(path: str | Path, config: dict) -> None:
    """Warn, once the directory loaded, of custom code it names and svdcompress did not run:
    the built-in classes of its model_type stand in for it."""
    path, tf = Path(path), transformers_lib()
    model_type = config.get("model_type")
    if config.get("auto_map"):
        warnings.warn(f"{path / 'config.json'} names custom code (auto_map): svdcompress never "
                      f"runs it and loads transformers' built-in {model_type!r} classes instead",
                      stacklevel=3)
    else:
        custom = [a for a in config.get("architectures") or [] if not hasattr(tf, a)]
        if custom:
            warnings.warn(f"{path / 'config.json'} names the class {custom[0]}, which transformers "
                          f"does not have: loaded with the built-in {model_type!r} classes", stacklevel=3)
    if (path / "tokenizer_config.json").is_file() and \
            read_json_object(path / "tokenizer_config.json").get("auto_map"):
        warnings.warn(f"{path / 'tokenizer_config.json'} names custom tokenizer code (auto_map): "
                      "svdcompress never runs it and uses transformers' own tokenizer classes",
                      stacklevel=3)


def load_pretrained(auto_class, path: str | Path, what: str, **kwargs):
    """``auto_class.from_pretrained(path)`` with every tensor from the directory's safetensors,
    no remote code and one-line errors. Call read_hf_config(path) first."""
    path = Path(path)
    if not any(path.glob("*.safetensors")):
        raise FormatError(f"{path} holds no .safetensors weights (svdcompress never loads "
                          "pickled weights)")
    model = _strict_load(auto_class, path, path, what, use_safetensors=True, **kwargs)
    with torch.device("meta"):  # what loading the compressed run will do: it must work too
        from_config(auto_class, load_config(path), path)
    return model


def _strict_load(auto_class, folder: Path, where: Path, what: str, **kwargs):
    """from_pretrained, then refuse anything not filled from the file and a model that does
    not run; ``where`` names the source in errors."""
    try:
        with warnings.catch_warnings():  # its warnings on odd configs: our errors say it
            warnings.simplefilter("ignore")
            model, info = auto_class.from_pretrained(
                str(folder), local_files_only=True, trust_remote_code=False,
                output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except MissingDependency:
        raise
    except Exception as err:  # any failure of a foreign loader on a user's directory
        raise FormatError(f"cannot load the {what} in {where}: {one_line(err)}") from err
    problems = []
    for key, label in (("missing_keys", "lacks"), ("unexpected_keys", "has unexpected"),
                       ("mismatched_keys", "has wrongly shaped")):
        names = sorted(k if isinstance(k, str) else str(k[0]) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            problems.append(f"{label} tensor(s) {', '.join(names[:3])}{more}")
    if info.get("error_msgs"):
        problems.append(one_line(Exception(str(info["error_msgs"][0]))))
    if any(str(k).endswith((".u", ".v")) for k in info.get("unexpected_keys") or ()):
        problems.insert(0, "its tensors look like svdcompress factors (a compressed model saved "
                           "with save_pretrained: svdcompress.save writes a run that load reads)")
    if problems:
        raise FormatError(f"the weights in {where} do not fit its config: {'; '.join(problems)} "
                          "(svdcompress never fills a model with random weights)")
    _check_runs(model.eval(), where)
    return model


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_source(path: str | Path) -> tuple[Path, str] | None:
    """(folder, file name) when ``path`` is a .gguf file, or a directory without config.json
    that holds exactly one; None for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(p.name for p in path.glob("*.gguf"))
        if len(found) > 1:
            raise FormatError(f"{path} holds {len(found)} GGUF files ({', '.join(found[:3])}): "
                              "name the one to load")
        if found:
            return path, found[0]
    return None


def load_gguf(folder: Path, name: str, dtype: str = "auto"):
    """(causal LM, tokenizer) from a GGUF file, its weights dequantised to ``dtype`` ("auto":
    float32), its tokenizer from the file's metadata. The config loses the GGUF quantisation
    entry: the compressed run is an ordinary one."""
    require("gguf", extra="gguf")
    require("accelerate", extra="gguf")
    tf = transformers_lib()
    where = folder / name
    dtype = torch.float32 if dtype == "auto" else DTYPES[dtype]
    with contextlib.redirect_stderr(io.StringIO()):  # its own dequantisation progress bar
        model = _strict_load(tf.AutoModelForCausalLM, folder, where, "GGUF model", gguf_file=name,
                             dtype=dtype)
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer, model.is_quantized = None, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = tf.AutoTokenizer.from_pretrained(str(folder), gguf_file=name,
                                                         local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise FormatError(f"cannot read the tokenizer of {where}: {one_line(err)}") from err
    _check_tokenizer(tokenizer, model.config, where)
    with torch.device("meta"):
        from_config(tf.AutoModelForCausalLM, model.config, where)
    return model, tokenizer


@torch.no_grad()
def _check_runs(model, path: Path) -> None:
    """One forward pass of two tokens: a config.json whose numbers fit every tensor's shape
    can still describe a model that does not compute (heads that do not divide the width)."""
    vocab = getattr(model.config, "vocab_size", None)
    ids = torch.arange(6).remainder(vocab if isinstance(vocab, int) and vocab > 0 else 1).reshape(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # a padded batch, as calibration batches are
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(input_ids=ids, attention_mask=mask)
    except Exception as err:
        raise FormatError(f"the model in {path} does not run with its config.json: "
                          f"{one_line(err)}") from err


def load_config(path: str | Path):
    """A transformers config object of a checked directory (no remote code)."""
    tf = transformers_lib()
    try:
        return tf.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise FormatError(f"cannot read the config in {path}: {one_line(err)}") from err


def from_config(auto_class, config, path: str | Path):
    """An empty model of ``config`` (its tensors are loaded after by svdcompress)."""
    try:
        return auto_class.from_config(config, trust_remote_code=False)
    except Exception as err:
        raise FormatError(f"cannot build the model of {Path(path) / 'config.json'}: "
                          f"{one_line(err)}") from err


def load_tokenizer(path: str | Path, config, *, required: bool):
    """The directory's own tokenizer; None when it has none and ``required`` is False."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        if required:
            raise FormatError(f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                              "svdcompress needs the model's own tokenizer to read text")
        return None
    tf = transformers_lib()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                         trust_remote_code=False)
    except Exception as err:
        raise FormatError(f"the tokenizer in {path} is corrupt or unreadable: {one_line(err)}") from err
    _check_tokenizer(tokenizer, config, path)
    return tokenizer


def _check_tokenizer(tokenizer, config, path: Path) -> None:
    try:  # options read only when text is tokenised (a model_max_length that is a string)
        tokenizer(["A short sentence to check the tokenizer."], truncation=True)
    except Exception as err:
        raise FormatError(f"the tokenizer in {path} is corrupt or unreadable: {one_line(err)}") from err
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise FormatError(f"the tokenizer in {path} has {len(tokenizer):,} tokens, more than the "
                          f"model's vocabulary of {vocab:,}: its files do not belong together")


def positions(config) -> tuple[int, str] | None:
    """(the number of positions the model was trained for, the config field), if it says."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit, key
    return None


def check_positions(config, length: int, what: str) -> None:
    """Refuse sequences longer than the positions the model was trained for (an absolute
    position table fails with an IndexError, rotary positions run on untrained)."""
    known = positions(config)
    if known is not None and length > known[0]:
        raise ConfigError(f"{what} {length} is longer than the model's {known[0]} positions "
                          f"({known[1]} in its config.json)")


def check_reference(model, reference, texts: str | list[str], run, ref_path) -> None:
    """Refuse a reference (or teacher) that is not the run's architecture, or whose
    tokenizer turns ``texts`` into other token ids than the run's does: its scores would
    compare different models or different tokens."""
    a, b = model.hf_config, reference.hf_config
    for key in SHAPE_FIELDS:
        if getattr(a, key, None) != getattr(b, key, None):
            raise ConfigError(f"{ref_path} is not the architecture of the run {run}: {key} is "
                              f"{getattr(b, key, None)!r}, the run's {getattr(a, key, None)!r}")
    if model.tokenizer is None or reference.tokenizer is None:
        return
    batch = texts if isinstance(texts, list) else [texts]
    mine = model.tokenizer(batch)["input_ids"]
    theirs = reference.tokenizer(batch)["input_ids"]
    if mine != theirs:
        raise ConfigError(f"the tokenizer of {ref_path} differs from the run's: the two models "
                          "would read other tokens from the same text")
