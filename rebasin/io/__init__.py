"""Checkpoint I/O: lazy safetensors reading, sharded atomic writing. No pickle, ever."""
from rebasin.io.checkpoint import Checkpoint, open_checkpoint
from rebasin.io.writer import CheckpointWriter, atomic_output_dir

__all__ = ["Checkpoint", "CheckpointWriter", "atomic_output_dir", "open_checkpoint"]
