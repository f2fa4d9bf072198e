"""`lorafit push FOLDER --repo-id ORG/NAME`: a run folder or export, with its model card, to the
Hugging Face hub (or the hub at $HF_ENDPOINT) through huggingface_hub (`HfApi.create_repo`,
`HfApi.upload_folder`).

What goes: every file of the folder except `checkpoints/` (resume state, not a model) and hidden
files (temporary files of atomic writes). The card (README.md) is regenerated from the folder's
files naming the repository it goes to; the folder itself is left as it is. Refused before anything
is sent: pickle files (loading one can run code; lorafit writes safetensors only) and links that
lead out of the folder.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import modelcard
from .distill import TEACHER_FILE
from .errors import UserError
from .rundir import RunDir

__all__ = ["push", "files_to_push", "check_repo_id", "PICKLE_SUFFIXES"]

log = logging.getLogger(__name__)

#: File types that are pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Folders of a run that are not part of the model.
SKIPPED = ("checkpoints",)
#: Run files not pushed: the teacher's logits on the training texts are the teacher's knowledge, not this model.
SKIPPED_FILES = (TEACHER_FILE,)

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    """ORG/NAME as the hub accepts it, or a one-line error."""
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        raise UserError(f"--repo-id {repo_id!r}: write ORG/NAME (a user or organisation, '/', a name; letters, "
                        "digits, '-', '_', '.'; no '--' or '..')")
    return repo_id


def files_to_push(folder: Path) -> list[str]:
    """The folder's files to upload, as paths relative to it; a UserError for a pickle file or a link
    that leads outside the folder."""
    root = folder.resolve()
    chosen = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are listed, not followed
        here = Path(dirpath)
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                _check_inside(here / name, root, folder)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink()
                             and not (here == folder and d in SKIPPED))
        for name in sorted(filenames):
            path = here / name
            relative = path.relative_to(folder).as_posix()
            if name.startswith(".") or (here == folder and name in SKIPPED_FILES):
                continue
            if path.is_symlink():
                _check_inside(path, root, folder)
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise UserError(f"{relative} is a pickle file ({path.suffix}), which can run code when loaded; "
                                "lorafit pushes safetensors only: remove it from the folder")
            chosen.append(relative)
    return chosen


def _check_inside(link: Path, root: Path, folder: Path) -> None:
    target = link.resolve()
    if target != root and root not in target.parents:
        raise UserError(f"{link.relative_to(folder).as_posix()} links outside the folder (to {target}); "
                        "copy what it points to into the folder, or remove the link")


def push(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         endpoint: str | None = None) -> dict:
    """Upload `folder` to `repo_id` (created if missing); returns the commit's URL and the file count."""
    check_repo_id(repo_id)
    run = RunDir(folder)
    run.config()  # a folder that is not there or not lorafit's: its one-line error
    files = files_to_push(run.path)

    from huggingface_hub import HfApi, constants, get_token

    token = token or get_token()  # HF_TOKEN, else a saved `hf auth login`
    if not token:
        raise UserError("no token: set HF_TOKEN or pass --token (a write token from the hub's settings)")
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set: pushing needs the network; unset it for this command")
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)

    with tempfile.TemporaryDirectory(prefix="lorafit-push-") as staging:
        stage = Path(staging)
        # What is uploaded: links to the checked files, and the card rendered for this repository.
        for relative in files:
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            os.symlink((run.path / relative).resolve(), stage / relative)
        _stage_card(run.path, stage, repo_id, files)
        patterns = [glob.escape(p) for p in sorted({*files, modelcard.CARD})]
        step = "accept the token"
        try:
            api.whoami()  # a token the hub refuses fails here, before a repository is made
            step = f"create {repo_id}"
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            step = f"take the upload to {repo_id}"
            info = api.upload_folder(repo_id=repo_id, folder_path=stage, repo_type="model", allow_patterns=patterns,
                                     commit_message=f"lorafit push: {run.path.name}")
        except UserError:
            raise
        except Exception as e:  # the client's errors: HTTP refusals, no connection, invalid card metadata
            raise _hub_error(e, endpoint, step) from None
    return {"commit_url": str(info.commit_url), "files": len(patterns)}


def _stage_card(folder: Path, stage: Path, repo_id: str, files: list[str]) -> None:
    card = stage / modelcard.CARD
    if card.is_symlink():
        card.unlink()
    try:
        card.write_text(modelcard.render(folder, repo_id))
    except UserError as e:
        if modelcard.CARD not in files:
            raise UserError(f"{folder} has no model card and none can be made here ({e})") from None
        log.warning("pushing the folder's own card unchanged: %s", e)
        shutil.copyfile(folder / modelcard.CARD, card)


def _hub_error(e: Exception, endpoint: str, step: str) -> UserError:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(e, "response", None)
    if isinstance(e, HfHubHTTPError) and response is not None:
        said = (e.server_message or "").strip().splitlines()
        reason = said[0] if said else getattr(response, "reason_phrase", "")
        return UserError(f"the hub at {endpoint} did not {step}: HTTP {response.status_code} {reason}".rstrip())
    text = " ".join(str(e).split())[:200] or type(e).__name__
    kinds = {cls.__name__ for cls in type(e).__mro__}
    if isinstance(e, OSError) or kinds & {"TransportError", "ConnectError", "TimeoutException", "NetworkError"}:
        return UserError(f"cannot reach the hub at {endpoint} ({type(e).__name__}: {text})")
    return UserError(f"the hub at {endpoint} did not {step}: {type(e).__name__}: {text}")  # e.g. card metadata refused
