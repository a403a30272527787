"""The update log of a run that draws directions: updates/<run_id>.bin in its run folder.

Replaying it on the base weights rebuilds the run bit for bit (see engine/model.py), so a run of a
billion parameters is resumed from a few numbers per step.
"""

import hashlib
import json
import os
import struct
from pathlib import Path

from zoflat_cli.errors import ZoflatError

UPDATE_LOG_VERSION = 3  # layout below; run folders record it and --resume checks it
MAGIC = b"ZOFLATUL"


class UpdateLog:
    """A 40-byte header (MAGIC, then the sha256 of the run's identity: runs/identity.py), then
    fixed-size little-endian records: int64 step, float64 accepted (1 or 0: conservative rules),
    then (uint64 direction base, float64 coefficient) per direction: the step's directions are
    (base, step); then, for an estimator that keeps `extra` numbers per direction (HiZOO, MeZO-SVRG),
    those, float64."""

    def __init__(self, path: Path, samples: int, identity: dict, extra: int = 0):
        self.path = path
        self.samples = samples
        self.record = struct.Struct("<qd" + "Qd" * samples + "d" * (extra * samples))
        self.header = MAGIC + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).digest()

    def read(self) -> list:
        """[(step, direction keys, coefs, accepted)]; a torn last record (killed mid-write) is ignored;
        the log of another run is an error."""
        if not self.path.exists():
            return []
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise ZoflatError(f"{self.path} cannot be read ({err.strerror}); restore it, or delete it to start "
                              f"its run over") from None
        if len(data) < len(self.header):  # killed while writing the header
            return []
        if data[:len(self.header)] != self.header:
            raise ZoflatError(f"{self.path} is the update log of another run or config; restore this run's, or "
                              f"delete it to start its run over")
        data = data[len(self.header):]
        usable = len(data) - len(data) % self.record.size
        n = 2 * self.samples
        return [(step, [(base, step) for base in pairs[:n:2]], list(pairs[1:n:2]) + list(pairs[n:]), bool(accepted))
                for step, accepted, *pairs in self.record.iter_unpack(data[:usable])]

    def truncate(self, records: int):
        if self.path.is_file():
            os.truncate(self.path, len(self.header) + records * self.record.size)

    def open(self):
        self.path.parent.mkdir(exist_ok=True)
        self._file = open(self.path, "ab")
        if self._file.tell() < len(self.header):  # new (or a torn header)
            self._file.truncate(0)
            self._file.write(self.header)
            self._file.flush()
        return self

    def append(self, step: int, keys, coefs, accepted: bool):
        pairs = [v for (base, _), c in zip(keys, coefs) for v in (base, c)]
        self._file.write(self.record.pack(step, float(accepted), *pairs, *coefs[len(keys):]))
        self._file.flush()

    def close(self):
        self._file.close()


def update_log_path(run_dir: Path, run_id: str) -> Path:
    return run_dir / "updates" / f"{run_id}.bin"
