"""Tiny model folders that tests build and save themselves, plus a fake hub cache.

Owns the shapes of test fixtures on disk: small causal LMs (llama, qwen2,
mistral; single-file or sharded safetensors), LoRA adapters on them, and the
"bad" folders the worker must refuse (pickle-only weights, remote code, an
unknown architecture). Nothing is downloaded; every builder is deterministic
for a given seed and returns the folder it wrote.

``build_hub_cache`` lays a folder out as a Hugging Face hub cache entry
(``models--org--name/{blobs,snapshots,refs,trees}``), checked against
huggingface_hub 2.4.0. Using it offline:

* In a fresh process (a worker subprocess), the environment is enough:
  ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE=<cache_dir>``.
* In-process, huggingface_hub reads both variables once, at import, into
  ``huggingface_hub.constants``; ``monkeypatch.setenv`` afterwards changes
  nothing. Patch ``huggingface_hub.constants.HF_HUB_OFFLINE`` (``is_offline_mode()``
  reads it) and pass ``cache_dir=`` explicitly (or patch
  ``constants.HF_HUB_CACHE``), or call with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "ModelKind",
    "build_hub_cache",
    "build_bpe_model",
    "build_bpe_tokenizer",
    "build_lora",
    "build_model",
    "build_pickle_only_model",
    "build_remote_code_model",
    "build_tokenizer",
    "build_unknown_arch",
    "hub_repo_folder",
    "tiny_config",
    "TOKENIZER_LINES",
]

ModelKind = Literal["llama", "qwen2", "mistral"]

_ARCHITECTURES: dict[str, tuple[Callable[..., PretrainedConfig], Callable[..., PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

# Files the Hub stores in Git LFS by default (its stock .gitattributes); their
# etag, hence their blob name in the cache, is the sha256 of the content.
_LFS_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npz", ".pkl"}
)
_COMMIT_LENGTH = 40
_HEX = frozenset("0123456789abcdef")


# -- causal LMs ---------------------------------------------------------------


def tiny_config(
    kind: ModelKind = "llama", *, hidden: int = 64, layers: int = 2, vocab: int = 256, tie: bool = False
) -> PretrainedConfig:
    """The config ``build_model`` uses: 4 heads, 2 KV heads, MLP twice as wide."""
    try:
        config_class, _ = _ARCHITECTURES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(_ARCHITECTURES)}") from None
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def _tiny_model(kind: ModelKind, *, seed: int, **sizes: Any) -> PreTrainedModel:
    _, model_class = _ARCHITECTURES[kind]
    torch.manual_seed(seed)
    return model_class(tiny_config(kind, **sizes))


def build_model(
    kind: ModelKind,
    path: str | os.PathLike[str],
    *,
    sharded: bool = False,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    tie: bool = False,
    tokenizer: bool = True,
) -> Path:
    """Save a tiny float32 causal LM as safetensors (about 0.5 MB at the defaults).

    ``sharded=True`` splits it into several ``model-0000x-of-0000y.safetensors``
    files and a ``model.safetensors.index.json``. ``tokenizer=True`` saves
    ``build_tokenizer``'s tokenizer beside the weights.
    """
    folder = Path(path)
    model = _tiny_model(kind, seed=seed, hidden=hidden, layers=layers, vocab=vocab, tie=tie)
    if sharded:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=max(total // 4, 1))
    else:
        model.save_pretrained(folder)
    if tokenizer:
        build_tokenizer(folder, vocab=vocab)
    return folder


# -- tokenizers ---------------------------------------------------------------

# What the test tokenizer knows: any text made of these words (any case) encodes
# without <unk>. Ids 0-3 are <pad>, <s> (bos), </s> (eos), <unk>, as in tiny_config.
TOKENIZER_LINES = (
    "the quick brown fox jumps over the lazy dog",
    "a cat sat on the mat and looked at the door",
    "one two three four five six seven eight nine ten",
    "red green blue yellow black white orange purple",
    "she sells sea shells by the sea shore",
    "models learn from data and adapters learn from less",
    "hello world this is a tiny test of a tiny model",
    "to be or not to be that is the question",
)


def build_tokenizer(path: str | os.PathLike[str], *, vocab: int = 256) -> Path:
    """Save a word-level fast tokenizer for ``TOKENIZER_LINES`` in ``path``, ``vocab`` ids in all.

    Its words are those of the lines in order of appearance, then fillers
    (``w70``...) so that every id a tiny model can emit decodes to a word.
    Lowercases, splits on whitespace and punctuation, prepends ``<s>``, decodes
    with spaces between words. Built offline with the ``tokenizers`` library and
    saved with ``save_pretrained``, so ``AutoTokenizer.from_pretrained(path)`` loads it.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    words = ["<pad>", "<s>", "</s>", "<unk>"]
    for word in " ".join(TOKENIZER_LINES).split():
        if word not in words:
            words.append(word)
    if len(words) > vocab:
        raise ValueError(f"the test tokenizer needs {len(words)} ids; the model has {vocab}")
    words += [f"w{index}" for index in range(len(words), vocab)]  # every id decodes to a word
    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    backend.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return folder


def build_bpe_tokenizer(path: str | os.PathLike[str], *, vocab: int = 320, add_bos: bool = True) -> Path:
    """Save a byte-level BPE tokenizer (GPT-2's kind) trained on ``TOKENIZER_LINES``, ``vocab`` ids.

    Any text encodes (bytes are its alphabet); spaces belong to the following word, as in
    GPT-2. Ids 0-2 are ``<pad>``, ``<s>``, ``</s>``. ``add_bos=True``: ``<s>`` is the BOS token
    and every encoding starts with it (Llama's way); ``add_bos=False``: no BOS token at all and
    nothing prepended (GPT-2's way; lm-eval then scores an empty context after ``</s>``).
    Trained offline with the ``tokenizers`` library; deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    folder = Path(path)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(TOKENIZER_LINES) * 4, trainer=trainer)
    if backend.get_vocab_size() > vocab:
        raise ValueError(f"the BPE tokenizer has {backend.get_vocab_size()} ids; the model has {vocab}")
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>" if add_bos else None,
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(str(folder))
    return folder


def build_bpe_model(path: str | os.PathLike[str], *, add_bos: bool = True, vocab: int = 320,
                    seed: int = 0, kind: ModelKind = "llama", hidden: int = 64, layers: int = 2) -> Path:
    """``build_model`` with ``build_bpe_tokenizer``'s tokenizer instead of the word-level one
    (a model length of 128 tokens, as ``tiny_config`` has it)."""
    folder = build_model(kind, path, seed=seed, hidden=hidden, layers=layers, vocab=vocab, tokenizer=False)
    build_bpe_tokenizer(folder, vocab=vocab, add_bos=add_bos)
    return folder


# -- adapters -----------------------------------------------------------------


def build_lora(
    base_path: str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    r: int = 4,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    base_name: str | None = None,
) -> Path:
    """Save a LoRA adapter for the model at ``base_path`` that really changes its logits.

    peft initialises ``lora_B`` to zeros (a no-op adapter); here it is random.
    ``adapter_config.json`` names ``base_name or str(base_path)`` as its base.
    """
    from peft import LoraConfig, get_peft_model

    folder = Path(path)
    base = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    # get_peft_model overwrites the field with the base's name_or_path; set it after.
    model.peft_config["default"].base_model_name_or_path = base_name or str(base_path)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(mean=0.0, std=0.5)
    # "auto" would look the base up on the Hub (a network call) to compare vocab sizes.
    model.save_pretrained(str(folder), save_embedding_layers=False)
    return folder


# -- folders the worker must refuse -------------------------------------------


def build_pickle_only_model(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """A tiny llama whose only weights are ``pytorch_model.bin`` (a pickle), no safetensors.

    transformers 5 dropped ``save_pretrained(safe_serialization=False)``, so the
    state dict is written with ``torch.save`` next to ``config.json``.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model = _tiny_model("llama", seed=seed)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


_REMOTE_CONFIGURATION = '''\
"""Remote code for a modelq test: importing this module leaves a marker file."""
with open({marker!r}, "a") as _marker:
    _marker.write("configuration_custom imported\\n")

from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "modelq_custom"
'''

_REMOTE_MODELING = '''\
"""Remote code for a modelq test: importing this module leaves a marker file."""
with open({marker!r}, "a") as _marker:
    _marker.write("modeling_custom imported\\n")

from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def build_remote_code_model(
    path: str | os.PathLike[str], marker_path: str | os.PathLike[str], *, seed: int = 0
) -> Path:
    """A tiny model that loads only through ``trust_remote_code`` (``model_type="modelq_custom"``).

    Its ``configuration_custom.py`` and ``modeling_custom.py`` append a line to
    ``marker_path`` when imported, so a test can prove the code never ran. With
    ``trust_remote_code=True`` it loads as a llama subclass.
    """
    folder = Path(path)
    marker = str(Path(marker_path).resolve())
    model = _tiny_model("llama", seed=seed)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="modelq_custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "configuration_custom.py").write_text(_REMOTE_CONFIGURATION.format(marker=marker))
    (folder / "modeling_custom.py").write_text(_REMOTE_MODELING.format(marker=marker))
    return folder


def build_unknown_arch(path: str | os.PathLike[str]) -> Path:
    """A folder whose ``config.json`` names ``model_type="not_a_real_arch"``, with a tiny safetensors file."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "not_a_real_arch",
        "architectures": ["NotARealArchForCausalLM"],
        "hidden_size": 8,
        "num_hidden_layers": 1,
        "vocab_size": 16,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.manual_seed(0)
    save_file(
        {"embed.weight": torch.randn(16, 8), "layers.0.weight": torch.randn(8, 8)},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


# -- hub cache ----------------------------------------------------------------


def hub_repo_folder(repo_id: str) -> str:
    """The cache folder name of a model repo: ``org/name`` -> ``models--org--name``."""
    return "--".join(["models", *repo_id.split("/")])


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _check_commit(commit: str) -> str:
    if len(commit) != _COMMIT_LENGTH or not set(commit) <= _HEX:
        raise ValueError(f"revision_commit must be 40 lowercase hex digits, got {commit!r}")
    return commit


def build_hub_cache(
    cache_dir: str | os.PathLike[str],
    repo_id: str,
    source_folder: str | os.PathLike[str],
    *,
    revision_commit: str | None = None,
    branch: str | None = "main",
) -> str:
    """Put every file of ``source_folder`` into a hub cache as one snapshot of ``repo_id``.

    Layout, as ``huggingface_hub`` writes it::

        <cache_dir>/models--org--name/
            blobs/<etag>                      sha256 for LFS files (weights), git blob sha1 otherwise
            snapshots/<commit>/<file>         relative symlink -> ../../blobs/<etag>
            refs/<branch>                     the commit, no trailing newline
            trees/<commit>.json               the cached tree listing

    The commit defaults to a hash of the contents (stable for equal folders).
    Call again with another folder to add a second revision; blobs are shared,
    and ``refs/<branch>`` moves to the newest call (``branch=None`` leaves refs alone).
    Returns the commit hash.
    """
    source = Path(source_folder)
    files = sorted(p for p in source.rglob("*") if p.is_file())
    if not files:
        raise ValueError(f"{source} holds no files")
    storage = Path(cache_dir) / hub_repo_folder(repo_id)
    blobs = storage / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)

    tree: dict[str, dict[str, Any]] = {}
    etags: dict[str, str] = {}
    for file in files:
        relative = file.relative_to(source).as_posix()
        data = file.read_bytes()
        if file.suffix in _LFS_SUFFIXES:
            sha256 = hashlib.sha256(data).hexdigest()
            etags[relative] = sha256
            tree[relative] = {
                "size": len(data),
                "blob_id": _git_blob_sha1(_lfs_pointer(sha256, len(data))),
                "lfs_sha256": sha256,
                "lfs_size": len(data),
            }
        else:
            etags[relative] = _git_blob_sha1(data)
            tree[relative] = {"size": len(data), "blob_id": etags[relative]}
        blob = blobs / etags[relative]
        if not blob.exists():
            shutil.copyfile(file, blob)

    if revision_commit is None:
        listing = json.dumps({name: etags[name] for name in sorted(etags)}, sort_keys=True)
        revision_commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
    commit = _check_commit(revision_commit)

    snapshot = storage / "snapshots" / commit
    for relative, etag in etags.items():
        pointer = snapshot / relative
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if pointer.is_symlink() or pointer.exists():
            pointer.unlink()
        pointer.symlink_to(os.path.relpath(blobs / etag, pointer.parent))

    if branch is not None:
        ref = storage / "refs" / branch
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)  # read back verbatim: a newline would break the lookup

    trees = storage / "trees"
    trees.mkdir(exist_ok=True)
    listing_file = {"format_version": 1, "files": {name: tree[name] for name in sorted(tree)}}
    (trees / f"{commit}.json").write_text(json.dumps(listing_file, indent=1))
    return commit
