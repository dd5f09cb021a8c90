"""The flows: one video (`generate_video`) and a batch from a manifest (`generate_batch`)."""

from wan_tasks.errors import BatchIncompleteError, VideoFailedError
from wan_tasks.flows.generate import generate_batch, generate_video

__all__ = ["BatchIncompleteError", "VideoFailedError", "generate_batch", "generate_video"]
