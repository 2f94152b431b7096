"""A run on disk: atomic writes, the model folder (manifest + safetensors shards) and the writer's lock.

Nothing else in the package opens model files; everything written into a run goes through `atomic`.
"""

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from .lock import run_lock

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_writable", "run_lock"]
