"""Commands on one node's model store: start or cancel a download, delete a model. The node runs them for its own
API and for the other nodes of its cluster (`net/model_commands.py`); each answer is what the API answers, status
code and message included, so a command gives the same answer whichever node's API it reached."""

from __future__ import annotations

from collections.abc import Callable

from ringlet.models.aliases import ModelAliases
from ringlet.models.download import DownloadError, DownloadManager, TooManyDownloads
from ringlet.models.store import ModelStore
from ringlet.shared.errors import ModelLoadError
from ringlet.shared.messages import CancelDownload, DeleteModel, ModelCommand, ModelCommandReply, StartDownload
from ringlet.shared.state import MAX_STORED_MODELS, StoredModelInfo

# the instance ids serving a model id (a model one serves is not deleted)
Serving = Callable[[str], list[str]]


def run_model_command(command: ModelCommand, downloads: DownloadManager, serving: Serving) -> ModelCommandReply:
    match command:
        case StartDownload(model=model, layers=layers):
            try:
                return ModelCommandReply(status=202, download=downloads.start(model, layers=layers))
            except TooManyDownloads as error:
                return ModelCommandReply(status=429, error=str(error), code="too_many_downloads")
            except ModelLoadError as error:
                return ModelCommandReply(status=400, error=str(error), code="invalid_model")
        case CancelDownload(download_id=download_id):
            try:
                return ModelCommandReply(status=200, download=downloads.cancel(download_id))
            except DownloadError as error:
                return ModelCommandReply(status=404, error=str(error), code="download_not_found")
        case DeleteModel(model=model):
            return delete_model(model, downloads.store or ModelStore(), serving)


def delete_model(model: str, store: ModelStore, serving: Serving) -> ModelCommandReply:
    """Remove `model` (a repo id) from the store, with the names copies gave it; not while an instance serves it."""
    try:
        stored = store.get(model)
    except ModelLoadError as error:
        return ModelCommandReply(status=400, error=str(error), code="invalid_model")
    name = stored.repo_id if stored is not None else model
    instances = serving(name)
    if instances:
        return ModelCommandReply(status=409, error=f"{name} is served by instance {instances[0]}; stop it first "
                                                   f"(DELETE /instance/{instances[0]})", code="model_in_use")
    try:
        removed = store.remove(name)
    except ModelLoadError as error:
        return ModelCommandReply(status=404, error=str(error), code="model_not_found")
    ModelAliases().remove_pointing_to(removed.repo_id)
    return ModelCommandReply(status=200, model=removed.repo_id)


def stored_models(store: ModelStore | None = None) -> list[StoredModelInfo]:
    """The models in the store (and the read-only model directories), as a node lists them in its NodeInfo."""
    return [StoredModelInfo(model=m.repo_id, bytes=m.size_bytes, status=m.status)
            for m in (store or ModelStore()).models()[:MAX_STORED_MODELS]]
