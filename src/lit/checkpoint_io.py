"""Checkpoint writing that never leaves a truncated file under the final name."""

from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from src import atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint through src.atomic (`<path>.tmp` in the same folder, fsynced, renamed onto
    `<path>`): a kill or a full disk mid-save leaves the previous checkpoint intact.

    Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
    temp folder; where that is another filesystem than the run folder (a node-local /tmp, the usual case
    on clusters) the final step is a copy, not a rename, so a kill during it truncates `last.ckpt`.
    Remote paths (s3://, gs://, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        atomic.torch_save(checkpoint, path)
