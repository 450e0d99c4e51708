"""The one error every checkpoint operation raises for a checkpoint it cannot read or write.

:func:`hub_error` turns the Hugging Face hub's own exceptions (offline, unreachable, no such
repository, revision or file) into that error, naming the repository and what to do.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "hub_error"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing a tensor or a file, holds a tensor of the wrong shape, or cannot be written."""


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline()) if callable(is_offline) else bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_error(error: BaseException, repo_id: str, *, filename: str | None = None) -> BaseException:
    """A :class:`CheckpointError` for a hub download of ``repo_id`` that failed with ``error``.

    Returns ``error`` itself when it is not one of the hub's known failures.
    """
    from huggingface_hub import errors

    what = f"{filename!r} of {repo_id!r}" if filename else repr(repo_id)
    local = "pass a local checkpoint directory, or"
    if isinstance(error, errors.GatedRepoError):
        return CheckpointError(
            f"{repo_id!r} is a gated repository on the Hugging Face hub: accept its terms on its hub page, "
            "then pass token=... (or log in with `hf auth login`)"
        )
    if isinstance(error, errors.RepositoryNotFoundError):
        return CheckpointError(
            f"{repo_id!r} is neither a local directory nor a repository on the Hugging Face hub (or it is private: "
            "pass token=...); check the spelling, or pass a local checkpoint directory"
        )
    if isinstance(error, errors.RevisionNotFoundError):
        return CheckpointError(
            f"{repo_id!r} has no such revision on the Hugging Face hub; pass an existing branch, tag or commit as revision"
        )
    if isinstance(error, errors.LocalEntryNotFoundError):
        if _offline():
            return CheckpointError(
                f"{what} is not in the local Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1); {local} "
                f"download it while online (`hf download {repo_id}`) and run again"
            )
        return CheckpointError(
            f"cannot reach the Hugging Face hub to download {what}, and it is not in the local cache "
            f"({str(error).splitlines()[-1][:200]}); check the network (or HF_ENDPOINT), {local} download it first"
        )
    if isinstance(error, errors.EntryNotFoundError):
        return CheckpointError(f"{what} is not on the Hugging Face hub: the repository lacks that file")
    if isinstance(error, errors.HfHubHTTPError):
        return CheckpointError(f"the Hugging Face hub failed to serve {what}: {str(error).splitlines()[0][:200]}")
    return error
