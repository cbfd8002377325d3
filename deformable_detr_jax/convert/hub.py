"""Model names: a local path, or a Hugging Face hub id downloaded into huggingface_hub's cache.

`resolve_model(name)` is the one place a model name becomes a local path; every entry point that
takes a model calls it (`Detector.from_pretrained`, `load_pytorch_checkpoint`, `model.init_from`,
`model.backbone_weights`, `predict --model`, `export MODEL`, `convert SRC`). The rule:

- an existing local path (a folder or a weights file; `~` expanded) wins;
- otherwise a string shaped like a hub repo id, `name` or `org/name` (letters, digits, `-`, `_`,
  `.`; not a weights or json file name), is looked up on the hub, at the revision given as
  `org/name@REVISION` (a branch, tag or commit: how a command line or a recipe names one) or
  `revision=`;
- anything else is a `FileNotFoundError`.

Only the files a model needs are downloaded (`hf_hub_download`, one file at a time): config.json,
then the first of model.safetensors, pytorch_model.bin or a sharded index (and its shards), and
preprocessor_config.json when the repository has one; the later files are pinned to the commit
config.json came from. They land in huggingface_hub's cache (`$HF_HUB_CACHE`, or `cache_dir=`),
and the folder returned is that commit's snapshot folder, which holds them under their hub names.
The endpoint (`HF_ENDPOINT`), the token (`token=`, else `HF_TOKEN`, else the token file `hf auth
login` writes) and offline mode (`HF_HUB_OFFLINE=1`: the cache only, no network) are
huggingface_hub's own. A model in the cache loads without the network; a file known to be absent
(huggingface_hub's `.no_exist` marks) is not asked for again.

Each failure is one `HubError` (a `CheckpointError`, so a `ValueError`) whose one-line message
names the id and says what to do: `HubRepoNotFoundError` (no such repository, or private or gated
without a token), `HubRevisionNotFoundError`, `HubFileNotFoundError` (no config.json or no weights
in the repository), `HubUnreachableError` (no network, or offline, and not in the cache).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from collections.abc import Callable
from typing import NoReturn

from deformable_detr_jax.convert.errors import (
    HubError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
)
from deformable_detr_jax.processing.image_processor import CONFIG_NAME as PREPROCESSOR_NAME

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
# Weights files of a hub-style folder, in order of preference; then their sharded indexes.
WEIGHTS_NAMES = (SAFETENSORS_NAME, "pytorch_model.bin")
INDEX_NAMES = tuple(f"{name}.index.json" for name in WEIGHTS_NAMES)

# huggingface_hub's rules (`validate_repo_id`): `name` or `org/name`, at most 96 characters each,
# no `--` or `..`; names of files a user might mean instead are left to the file system.
_REPO_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".json", ".git")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_hub_id(name: object) -> bool:
    """Whether `name` is shaped like a hub repo id (`name` or `org/name`); says nothing of
    whether such a repository exists, nor whether a local path of that name does."""
    return (
        isinstance(name, str)
        and _REPO_ID.fullmatch(name) is not None
        and "--" not in name
        and ".." not in name
        and not name.lower().endswith(_FILE_SUFFIXES)
    )


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> pathlib.Path:
    """The local path of a model: `name_or_path` itself when it exists, else the hub snapshot
    folder of the repo id it names, downloaded when not cached (see the module docstring).

    Args:
      name_or_path: a folder, a weights file, or a hub id (`org/name`, or `org/name@REVISION`).
      revision: a branch, tag or commit of the hub repository (default: `main`); hub ids only.
      cache_dir: huggingface_hub's cache folder (default: `$HF_HUB_CACHE`, `~/.cache/huggingface/
        hub`); hub ids only.
      token: a hub token (default: huggingface_hub's, from `HF_TOKEN` or the token file); `False`
        sends none; hub ids only.

    Raises:
      FileNotFoundError: no such local path, and not a hub id.
      HubError: a hub id that cannot be resolved (its subclasses above).
    """
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"a model is a path or a hub id (str), got {type(name_or_path).__name__}")
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path
    name_or_path, revision = _split_revision(name_or_path, revision)
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(
            f"no model folder or weights file at {os.fspath(name_or_path)!r}, and it is not a "
            "Hugging Face hub id ('org/name'); check the path"
        )
    return download_model(name_or_path, revision=revision, cache_dir=cache_dir, token=token)


def _split_revision(name: str | os.PathLike, revision: str | None) -> tuple:
    """`("org/name", "REVISION")` of `"org/name@REVISION"`; anything else unchanged."""
    if not isinstance(name, str) or "@" not in name:
        return name, revision
    repo_id, _, named = name.rpartition("@")
    if not (is_hub_id(repo_id) and named):
        return name, revision
    if revision is not None and revision != named:
        raise ValueError(
            f"{name!r} names revision {named!r} and revision={revision!r} another: give one"
        )
    return repo_id, named


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> pathlib.Path:
    """The snapshot folder holding a hub model's config.json, weights and (when the repository
    has one) preprocessor_config.json, each downloaded unless cached. Raises `HubError`s."""
    fetch = _Fetcher(repo_id, revision, cache_dir, token)
    config = fetch.required(CONFIG_NAME, what=CONFIG_NAME)
    folder = config.parent
    if _COMMIT.fullmatch(folder.name):
        fetch.revision = folder.name  # the rest from the same commit, even if the branch moves
    weights = fetch.first(WEIGHTS_NAMES + INDEX_NAMES)
    if weights is None:
        fetch.fail_missing(" or ".join(WEIGHTS_NAMES + INDEX_NAMES[:1]))
    if weights.name in INDEX_NAMES:
        for shard in _shard_names(weights):
            fetch.required(shard, what=f"{shard} (a shard {weights.name} names)")
    fetch.first((PREPROCESSOR_NAME,))
    return folder


def _shard_names(index: pathlib.Path) -> list[str]:
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise HubFileNotFoundError(f"{index}: not a sharded-checkpoint index ({e!r})") from None


class _Fetcher:
    """`hf_hub_download` of one repository's files, its errors turned into `HubError`s."""

    def __init__(self, repo_id: str, revision, cache_dir, token):
        # here: only hub ids need huggingface_hub (an import of about 0.2 s)
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors

        self.hub = huggingface_hub
        self.repo_id, self.asked = repo_id, revision or "main"
        self.revision = self.asked
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self.token = token
        self.unreachable: Exception | None = None

    def _download(self, filename: str) -> pathlib.Path:
        path = self.hub.hf_hub_download(
            self.repo_id,
            filename,
            revision=self.revision,
            cache_dir=self.cache_dir,
            token=self.token,
            library_name="deformable_detr_jax",
        )
        return pathlib.Path(path)

    def required(self, filename: str, *, what: str) -> pathlib.Path:
        """The file, downloaded unless cached; a `HubError` when it cannot be had."""
        return self._translated(lambda: self._download(filename), what)

    def first(self, names: tuple[str, ...]) -> pathlib.Path | None:
        """The first of `names` the repository has (cached, else downloaded); None when it has
        none of them, or when those it might have cannot be reached (`unreachable`)."""
        for name in names:
            cached = self.hub.try_to_load_from_cache(
                self.repo_id, name, cache_dir=self.cache_dir, revision=self.revision
            )
            if isinstance(cached, str):
                return pathlib.Path(cached)
            if cached is not None:  # huggingface_hub's mark of a file the commit lacks
                continue
            try:
                return self.required(name, what=name)
            except HubFileNotFoundError:
                continue  # the hub says the commit lacks it
            except HubUnreachableError as err:
                self.unreachable = err
        return None

    def fail_missing(self, what: str) -> NoReturn:
        if self.unreachable is not None:
            raise self.unreachable
        raise HubFileNotFoundError(self._missing_message(what))

    def _missing_message(self, what: str) -> str:
        return (
            f"the hub model {self.repo_id!r} (revision {self.asked!r}) has no {what}: it is not "
            "a transformers Deformable DETR repository (config.json + model.safetensors or "
            "pytorch_model.bin); download its weights file and pass that path instead"
        )

    def _translated(self, call: Callable[[], pathlib.Path], what: str) -> pathlib.Path:
        errors = self.hub.errors
        try:
            return call()
        except errors.LocalEntryNotFoundError as err:  # before EntryNotFoundError, its base
            raise HubUnreachableError(self._unreachable_message(err, what)) from err
        except errors.RevisionNotFoundError as err:
            raise HubRevisionNotFoundError(
                f"the hub model {self.repo_id!r} has no revision {self.asked!r}: pass an "
                "existing branch, tag or commit hash (revision=... or 'org/name@REVISION')"
            ) from err
        except errors.EntryNotFoundError as err:
            raise HubFileNotFoundError(self._missing_message(what)) from err
        except errors.GatedRepoError as err:
            raise HubRepoNotFoundError(
                f"the hub model {self.repo_id!r} is gated: accept its conditions at "
                f"{self._endpoint()}/{self.repo_id}, then log in (`hf auth login`, or set "
                "HF_TOKEN) or pass token=..."
            ) from err
        except errors.RepositoryNotFoundError as err:
            raise HubRepoNotFoundError(
                f"{self.repo_id!r} is not a local path, and the Hugging Face hub "
                f"({self._endpoint()}) has no model {self.repo_id!r}: check the name, or for a "
                "private model log in (`hf auth login`, or set HF_TOKEN) or pass token=..."
            ) from err
        except errors.HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", "an error")
            raise HubError(
                f"the Hugging Face hub ({self._endpoint()}) answered {status} for "
                f"{self.repo_id!r} ({what}): {_one_line(err)}; check the token (HF_TOKEN, `hf "
                "auth login`, token=...) and try again"
            ) from err

    def _unreachable_message(self, err: Exception, what: str) -> str:
        cache = self.cache_dir or self.hub.constants.HF_HUB_CACHE
        where = f"{what} of {self.repo_id!r} (revision {self.asked!r}) is not in the cache {cache}"
        if self.hub.constants.HF_HUB_OFFLINE:
            return (
                f"HF_HUB_OFFLINE is set and {where}: download it once with the network on "
                "(unset HF_HUB_OFFLINE), or pass a local folder"
            )
        cause = err.__cause__ or err.__context__
        reason = f" ({type(cause).__name__}: {_one_line(cause)})" if cause is not None else ""
        return (
            f"cannot reach the Hugging Face hub at {self._endpoint()}{reason}, and {where}: "
            "check the network (or HF_ENDPOINT), or pass a local folder"
        )

    def _endpoint(self) -> str:
        return self.hub.constants.ENDPOINT


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
