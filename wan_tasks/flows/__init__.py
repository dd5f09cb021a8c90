"""The flows: one video (`generate_video`) and a batch from a manifest (`generate_batch`)."""

from wan_tasks.flows.generate import (
    BatchIncompleteError,
    VideoFailedError,
    generate_batch,
    generate_video,
)

__all__ = ["BatchIncompleteError", "VideoFailedError", "generate_batch", "generate_video"]
