"""The update log of a run that draws directions: updates/<run_id>.bin in its run folder.

Replaying it on the base weights rebuilds the run bit for bit (see engine/model.py), so a run of a
billion parameters is resumed from a few numbers per step.
"""

import os
import struct
from pathlib import Path

UPDATE_LOG_VERSION = 2  # record layout below; run folders record it and --resume checks it


class UpdateLog:
    """Fixed-size little-endian records: int64 step, float64 accepted (1 or 0: conservative
    rules), then (uint64 direction base, float64 coefficient) per direction: the step's
    directions are (base, step)."""

    def __init__(self, path: Path, samples: int):
        self.path = path
        self.record = struct.Struct("<qd" + "Qd" * samples)

    def read(self) -> list:
        """[(step, direction keys, coefs, accepted)]; a torn last record (killed mid-write) is ignored."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        usable = len(data) - len(data) % self.record.size
        return [(step, [(base, step) for base in pairs[0::2]], list(pairs[1::2]), bool(accepted))
                for step, accepted, *pairs in self.record.iter_unpack(data[:usable])]

    def truncate(self, records: int):
        if self.path.is_file():
            os.truncate(self.path, records * self.record.size)

    def open(self):
        self.path.parent.mkdir(exist_ok=True)
        self._file = open(self.path, "ab")
        return self

    def append(self, step: int, keys, coefs, accepted: bool):
        pairs = [v for (base, _), c in zip(keys, coefs) for v in (base, c)]
        self._file.write(self.record.pack(step, float(accepted), *pairs))
        self._file.flush()

    def close(self):
        self._file.close()


def update_log_path(run_dir: Path, run_id: str) -> Path:
    return run_dir / "updates" / f"{run_id}.bin"
