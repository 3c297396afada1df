"""A model named by its Hugging Face Hub repo id (``Qwen/Qwen3-0.6B``): resolved to a folder of the Hub's cache.

MODEL is a local path when that path exists (a file or folder of that name in the current directory wins over a
repo id of the same spelling); otherwise, when it has the form ``owner/name``, a repo id. Resolution goes through
``huggingface_hub``'s cache (``HF_HUB_CACHE`` / ``HF_HOME``), which it shares with transformers and the ``hf``
command: files already there are not downloaded again, ``HF_HUB_OFFLINE=1`` uses the cache alone, and a token comes
from ``HF_TOKEN`` or ``hf auth login`` as for every Hugging Face tool.

Only what conversion reads is downloaded, in two steps: config.json, the tokenizer files, generation_config.json,
hf_quant_config.json and model.safetensors.index.json first; then the safetensors shards the index lists (or every
``model*.safetensors`` when there is no index: llama.cpp's converter reads those names), with huggingface_hub's
progress bars on stderr. Every failure becomes one ConvertError saying what to do.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import ConvertError
from .vocab import TOKENIZER_FILES

# owner/name as the Hub allows them (letters, digits, - _ . ; no "--" or ".." and no leading/trailing - or .)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
SMALL_FILES = ("config.json", "generation_config.json", "hf_quant_config.json", "model.safetensors.index.json",
               *TOKENIZER_FILES, "additional_chat_templates/*.jinja")


def looks_like_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and ".." not in model and "--" not in model and not model.endswith(".")


def _offline() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it once, when first imported)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    """The Hub cache folder, from the environment as it is now."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return str(constants.HF_HUB_CACHE)


def resolve_model(model: str, revision: str | None = None) -> tuple[str, str | None]:
    """(local path, repo id or None) for MODEL: the path itself when it exists, else the cached snapshot folder of the
    Hub repo ``model`` at ``revision`` (downloading what conversion needs unless offline)."""
    if os.path.exists(model):
        if revision is not None:
            raise ConvertError(f"{model} is a local path: --revision applies to a Hugging Face repo id only")
        return model, None
    if not looks_like_repo_id(model):
        raise ConvertError(f"{model}: no such file or directory (nor a Hugging Face repo id such as Qwen/Qwen3-0.6B)")
    return download(model, revision), model


def download(repo_id: str, revision: str | None = None) -> str:
    """The snapshot folder of ``repo_id`` at ``revision`` holding config, tokenizer and safetensors files."""
    offline = _offline()
    folder = _snapshot(repo_id, revision, list(SMALL_FILES), offline)
    snap = Path(folder)
    if not (snap / "config.json").is_file():
        raise ConvertError(f"{repo_id}: the repository has no config.json" + (
            " in the cache (HF_HUB_OFFLINE is set: download it once without it)" if offline else
            ": it is not a transformers checkpoint gguftool can convert"))
    shards = _shard_names(snap)
    folder = _snapshot(repo_id, revision, shards or ["model*.safetensors"], offline)
    snap = Path(folder)
    present = sorted(p.name for p in snap.glob("model*.safetensors"))
    missing = [s for s in shards if not (snap / s).is_file()]
    if missing or not present:
        what = f"shard(s) {', '.join(missing[:3])}" if missing else "no model*.safetensors file"
        raise ConvertError(f"{repo_id}: {what} " + (
            "in the Hugging Face cache, and HF_HUB_OFFLINE is set: download the model once without it"
            if offline else "in the repository: gguftool converts safetensors checkpoints (not .bin, .gguf or "
                            "consolidated.safetensors)"))
    return folder


def _shard_names(snap: Path) -> list[str]:
    index = snap / "model.safetensors.index.json"
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConvertError(f"{index}: not a valid index ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConvertError(f"{index}: has no 'weight_map' object of file names")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if "/" in n or "\\" in n or n.startswith(".") or not n.endswith(".safetensors")]
    if bad:
        raise ConvertError(f"{index}: weight_map names file {bad[0]!r}, not a .safetensors file of the repository")
    return names


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], offline: bool) -> str:
    """snapshot_download of the files matching ``patterns``, its errors turned into one line saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as E

    rev = f" at revision {revision!r}" if revision else ""
    token_hint = "set HF_TOKEN to a token that can read it (or run `hf auth login`)"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=_cache_dir(),
                                 local_files_only=offline)
    except E.GatedRepoError:
        raise ConvertError(f"{repo_id} is a gated repository: accept its conditions on "
                           f"https://huggingface.co/{repo_id}, then {token_hint}") from None
    except E.RevisionNotFoundError:
        raise ConvertError(f"{repo_id}: no revision {revision!r} (a branch, tag or commit of the repository)") from None
    except E.RepositoryNotFoundError:
        raise ConvertError(f"{repo_id}: no such local path, and no Hugging Face repository of that name (if it is "
                           f"private, {token_hint})") from None
    except E.LocalEntryNotFoundError:   # (also IncompleteSnapshotError: a cached copy missing files)
        if offline:
            raise ConvertError(f"{repo_id}: no such local path, and as a Hugging Face repo id{rev} it is not "
                               f"(completely) in the cache ({_cache_dir()}) while HF_HUB_OFFLINE is set: download it "
                               f"once without HF_HUB_OFFLINE") from None
        raise ConvertError(f"{repo_id}: no such local path, and as a Hugging Face repo id{rev} it is not in the cache "
                           f"({_cache_dir()}) and the Hub cannot be reached: check the network connection") from None
    except E.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = token_hint if status in (401, 403) else "try again later"
        raise ConvertError(f"{repo_id}: the Hugging Face Hub answered HTTP {status}; {hint}") from None
    except E.HFValidationError as e:
        raise ConvertError(f"{repo_id}: not a valid Hugging Face repo id ({e})") from None
    except Exception as e:   # the HTTP client's own errors (a proxy refusing, a broken download) vary by version
        raise ConvertError(f"{repo_id}: downloading from the Hugging Face Hub failed ({e.__class__.__name__}: "
                           f"{str(e)[:120]})") from None
