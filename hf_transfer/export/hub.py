"""Pushing an output folder to the Hub: one commit made with `HfApi.upload_folder`.

The token is found the usual huggingface_hub way (`hf auth login`, HF_TOKEN) and never printed.
A folder whose card names its own location is given a card naming the repository first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hf_transfer.errors import HfTransferError
from hf_transfer.export.card import load_run, write_model_card
from hf_transfer.export.layout import (
    IMAGE,
    METRICS_FILE,
    RECIPE_FILE,
    TEXT,
    folder_kind,
)
from hf_transfer.recipe import check_repo_id

# never uploaded: resumable training state, caches, and anything half-written
PUSH_IGNORE = ["checkpoints/**", "feature_cache/**", ".staging/**", "*.tmp", "**/*.tmp"]
DEFAULT_PUSH_TIMEOUT = 60.0  # seconds without progress on one request; large files still upload




@contextmanager
def _request_timeout(seconds: float) -> Iterator[None]:
    """huggingface_hub's shared HTTP client waits forever by default; bound each request."""
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise HfTransferError(f"{folder} is not a folder; give the output folder of a run.")
    if (folder / RECIPE_FILE).is_file() and not (folder / METRICS_FILE).is_file():
        raise HfTransferError(
            f"{folder} holds no finished model yet (no metrics.json): finish the run "
            "(`hf-transfer train ... --resume` continues a stopped one), then push."
        )
    if not any(p.is_file() for p in folder.iterdir()):
        raise HfTransferError(f"{folder} is empty; nothing to push.")
    if not (folder / RECIPE_FILE).is_file():
        # a data folder or a home directory pushed by a slip would be public by default
        raise HfTransferError(
            f"{folder} is not the output folder of an hf-transfer run (no recipe.yaml); push uploads finished runs only."
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    endpoint: str | None = None,
    timeout: float = DEFAULT_PUSH_TIMEOUT,
) -> str:
    """Create `repo_id` if needed and upload `folder` to it in one commit; returns the commit URL.

    On failure the local folder stays complete, and the error says how to push it again.
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    check_repo_id(repo_id)
    _check_folder(folder)
    again = f"The folder {folder} is complete; push it later with: hf-transfer push {folder} --repo-id {repo_id}"
    token = get_token()
    if not token:
        raise HfTransferError(
            f"No Hugging Face token found. Log in with `hf auth login` (or set HF_TOKEN) with a token that can "
            f"write to {repo_id}. {again}"
        )
    if constants.is_offline_mode():
        raise HfTransferError(
            "The Hub is in offline mode (HF_HUB_OFFLINE is set, or the Hub was out of reach when training "
            f"started). {again} once the Hub can be reached."
        )
    run = load_run(folder)
    if run is not None and folder_kind(folder) in (TEXT, IMAGE):  # its "how to use" names the repository from now on
        write_model_card(folder, *run, repo_id=repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with _request_timeout(timeout):
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                folder_path=folder, repo_id=repo_id, repo_type="model", ignore_patterns=PUSH_IGNORE,
                commit_message=f"Upload {run[0].name if run else folder.name} with hf_transfer",
            )
    except Exception as error:  # HTTP status, timeout, connection, invalid metadata: all end the same way
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise HfTransferError(f"Pushing to {repo_id} failed ({reason.replace(token, '***')}). {again}") from None
    return commit.commit_url
