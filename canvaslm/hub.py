"""Checkpoints named by Hugging Face repo id (`google/diffusiongemma-26b-a4b-it`), as vLLM takes them.

`resolve_model(name)` returns a checkpoint directory: a local directory as it is; otherwise a repo id is
looked up in the Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`, where `hf download` puts it) through
`huggingface_hub.snapshot_download`, which downloads the files a checkpoint needs (config, weights,
tokenizer, chat templates) when they are missing and the machine is online. With `HF_HUB_OFFLINE=1` (or
transformers' `TRANSFORMERS_OFFLINE=1`, as huggingface_hub takes them; read at each call) only the cache
is used, and a model that is not there (or only partly: a snapshot without weights, such as the
config.json `canvaslm memory` fetches) is an error naming the repo and the cache, never a network call.
`resolve_adapter` does the same for a LoRA adapter repo, fetching its adapter_model.bin (older peft
adapters) only when the repo has no adapter_model.safetensors.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# what a checkpoint directory holds (checkpoint.py, config.py, tokenizer.py); other repo files are skipped
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # lora_serving's two, safetensors preferred
TEMPLATES_DIR = "additional_chat_templates"  # NAME.jinja: the named chat templates tokenizer.py reads


def _skip_subfolders_but(folder: str) -> list[str]:
    """Patterns matching every path in a sub-folder (an original/ copy of the weights, gguf/ ...: a checkpoint
    is top-level) except the files directly in `folder`/. huggingface_hub matches them with fnmatch, whose `*`
    also matches '/' and which has no negation, so "a first folder that is not `folder`" is spelled out: one
    differing at each character, one shorter (a prefix of it), one longer."""
    skip = ["*/*/*"]  # two folders deep, `folder`'s included
    for i, c in enumerate(folder):
        skip.append(f"{folder[:i]}[!{c}]*/*")  # the first folder differs from `folder` at character i
        if i:
            skip.append(f"{folder[:i]}/*")  # the first folder is `folder`'s first i characters
    skip.append(f"{folder}?*/*")  # the first folder is `folder` and more ('?' matching '/' needs a second one)
    return skip


SKIP = _skip_subfolders_but(TEMPLATES_DIR)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def is_repo_id(name) -> bool:
    """Whether `name` reads as `owner/name` and is not an existing local path."""
    return isinstance(name, str) and bool(_REPO_ID.match(name)) and ".." not in name and not Path(name).exists()


def _offline_var() -> str | None:
    """The variable that makes huggingface_hub offline: HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE where
    HF_HUB_OFFLINE is unset or empty (huggingface_hub's rule; its own constant is read once, at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(var, "").strip()
        if value:
            return var if value.lower() in ("1", "true", "yes", "on") else None
    return None


def offline() -> bool:
    return _offline_var() is not None


def resolve_model(name: str | Path, revision: str | None = None, what: str = "model",
                  weights: str = "*.safetensors") -> Path:
    """The checkpoint directory `name` stands for (module docstring). Errors name `what` and `name`; offline, a
    snapshot without a file matching `weights` is only partly in the cache."""
    path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision} applies to a Hugging Face repo id, and {what} {name} is a "
                             "local directory")
        return path
    if path.exists():
        raise FileNotFoundError(f"{what} {name} is a file; expected a checkpoint directory or a repo id")
    if not is_repo_id(str(name)):
        raise FileNotFoundError(f"{what} {name}: no such checkpoint directory (nor an owner/name repo id)")
    snapshot = _snapshot(str(name), revision, what, CHECKPOINT_FILES)
    if offline() and not any(snapshot.glob(weights)):  # e.g. the config.json `canvaslm memory` fetched
        held = ", ".join(sorted(p.name for p in snapshot.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{what} {name}{'@' + revision if revision else ''} is only partly in the Hugging Face cache "
            f"({snapshot} holds {held}; no weights) and {_offline_var()} is set; download it with "
            f"`hf download {name}` or pass a checkpoint directory")
    return snapshot


def resolve_adapter(name: str) -> Path:
    """The snapshot of LoRA adapter repo `name` (errors as `resolve_model`'s): its config and safetensors
    weights, or, for a repo without those, its adapter_model.bin."""
    what = "LoRA adapter"
    snapshot = resolve_model(name, what=what, weights="adapter_model.*")
    if not (snapshot / ADAPTER_WEIGHTS[0]).is_file() and not offline():  # a second look-up, for .bin-only repos
        snapshot = _snapshot(name, None, what, [ADAPTER_WEIGHTS[1]])
    return snapshot


def _snapshot(name: str, revision: str | None, what: str, patterns: list) -> Path:
    """huggingface_hub's snapshot of the files of repo `name` matching `patterns` (downloaded where missing;
    from the cache only, offline); its errors as ours, naming `what` and `name`."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ValueError(f"{what} {name} is not a local directory; to load it by repo id, install "
                         "huggingface_hub (pip install huggingface_hub), or download it and pass the "
                         "directory") from None
    from huggingface_hub import constants

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=patterns, ignore_patterns=SKIP,
                                      local_files_only=offline()))
    except LocalEntryNotFoundError:
        how = f"{_offline_var()} is set" if offline() else "it could not be downloaded"
        raise FileNotFoundError(
            f"{what} {name}{'@' + revision if revision else ''} is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and {how} (nor is it a local directory); fetch it with "
            f"`hf download {name}` or pass a checkpoint directory") from None
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise ValueError(f"{what} {name}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    except HfHubHTTPError as e:
        raise ValueError(f"{what} {name}: download failed: {str(e).splitlines()[0]}") from None


__all__ = ["resolve_model", "resolve_adapter", "is_repo_id", "CHECKPOINT_FILES"]
