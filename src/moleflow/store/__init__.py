"""A run on disk: atomic writes, the model folder (manifest + safetensors shards) and the writer's lock.

Nothing else in the package opens model files; every file written into a run goes through `atomic`, except
the verdict store's database (`store.verdicts`, RUN/verdicts.sqlite by default), which SQLite (or the
database server) keeps consistent itself. Import `store.verdicts` only where SQLAlchemy is installed.
"""

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable
from .lock import run_lock

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "check_writable", "run_lock"]
