"""Typed errors of checkpoint reading and conversion, and of hub ids (all are `ValueError`s).

Every error names the file or keys at fault and, where there is one, what to do about it.
`CheckpointKeyError.from_problems` builds the one message that lists every missing,
unexpected and mis-shaped key at once, so a user sees the whole mismatch in one run.
"""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(ValueError):
    """A checkpoint could not be read or converted."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing was executed."""


class CheckpointFormatError(CheckpointError):
    """The file is not a checkpoint in a supported format (or is truncated)."""


class CheckpointKeyError(CheckpointError):
    """Missing, unexpected or mis-shaped parameters; the message lists all of them."""

    def __init__(
        self,
        message: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mis_shaped: Iterable[str] = (),
    ):
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mis_shaped = tuple(mis_shaped)

    @classmethod
    def from_problems(
        cls,
        what: str,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mis_shaped: Iterable[str] = (),
        hint: str = "",
    ) -> CheckpointKeyError:
        """One error listing every problem, e.g. `from_problems("state dict", missing=[...])`.

        `mis_shaped` entries are free text (`"key: checkpoint (3, 4), expected (4, 3)"`).
        """
        missing, unexpected, mis_shaped = sorted(missing), sorted(unexpected), list(mis_shaped)
        parts = []
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with the wrong shape", mis_shaped),
        ):
            if items:
                parts.append(f"{len(items)} key(s) {title}:\n  " + "\n  ".join(items))
        message = f"{what} does not match:\n" + "\n".join(parts)
        if hint:
            message += f"\n{hint}"
        return cls(message, missing=missing, unexpected=unexpected, mis_shaped=mis_shaped)


class ConfigMismatchError(CheckpointError):
    """The config contradicts what the weights say (e.g. num_labels)."""


class HubError(CheckpointError):
    """A Hugging Face hub id could not be resolved to a model (`convert.hub`); the message names
    the id and what to do."""


class HubRepoNotFoundError(HubError):
    """The hub has no such repository (or it is private or gated and no token gives access)."""


class HubRevisionNotFoundError(HubError):
    """The repository has no such branch, tag or commit."""


class HubFileNotFoundError(HubError):
    """The repository lacks a file a model needs (config.json, the weights, a shard)."""


class HubUnreachableError(HubError):
    """The hub cannot be reached (no network, or `HF_HUB_OFFLINE`) and the model is not cached."""
