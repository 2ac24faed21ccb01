"""Every file format rebasin reads or writes: lazy safetensors checkpoints, sharded atomic
writing, the permutations file, JSON files. No pickle, ever."""
from rebasin.io.checkpoint import Checkpoint, open_checkpoint
from rebasin.io.jsonfile import read_json
from rebasin.io.perms_file import load_perms, save_perms
from rebasin.io.writer import CheckpointWriter, atomic_output_dir

__all__ = ["Checkpoint", "CheckpointWriter", "atomic_output_dir", "load_perms", "open_checkpoint", "read_json",
           "save_perms"]
