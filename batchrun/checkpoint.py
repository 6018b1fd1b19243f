"""The checkpoint beside an output file: manifest, fingerprint check, resume skip-set, run lock.

`OUTPUT.parts/` holds `manifest.json` (what the job was, and how many rows its last run
covered), `lock` (the pid of the run using it), the journal segments and the part files. A
resumed run must have the same fingerprint; it first folds what a killed run left in the
journal into part files, then skips rows whose latest result is ok and tries the others again.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from batchrun.errors import ConfigError, InputError
from batchrun.job import Job
from batchrun.logs import scrub
from batchrun.sinks import (
    INDEX_COLUMN,
    PAID_BEFORE_COLUMN,
    list_journals,
    list_parts,
    part_schema,
    parts_dir,
    recover_journals,
    remove_output,
    shard_dirs,
)
from batchrun.sources import input_identity

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST = "manifest.json"
LOCK = "lock"


def _describe_change(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changes += _describe_change(before, after, f"{prefix}{key}.")
        else:
            changes.append(f"{prefix}{key}: {before!r} -> {after!r}")
    return changes


def _input_change(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "the checkpoint does not say what it was"
    if old.get("name") != new["name"]:
        return f"it was {old.get('name')!r}"
    if old.get("size") != new["size"]:
        return f"{old.get('size')} bytes then, {new['size']} now"
    if "sha256" not in old:
        return "the checkpoint was made by an older batchrun, which did not hash all of it"
    return "same size, different content"


#: a position's latest result, one byte each in `ResumeState.latest`
NOT_DONE, DONE_OK, DONE_ERROR = 0, 1, 2


@dataclass(frozen=True)
class ResumeState:
    """What a checkpoint already holds: one byte per position, so a million rows take 1 MB."""

    latest: bytearray  # NOT_DONE, DONE_OK or DONE_ERROR per input position
    rows_done: int
    rows_ok: int
    #: what every answer in the checkpoint cost, superseded ones included: all were paid;
    #: each counted once, though a re-asked row's answers are in its earlier rows too
    spent_usd: float = 0.0

    def ok_mask(self) -> bytearray:
        """A byte per position, set where the latest result is ok (the rows to skip)."""
        return ok_mask(self.latest)

    def error_mask(self) -> bytearray:
        """A byte per position, set where the latest result is an error (rows asked again)."""
        return error_mask(self.latest)


def ok_mask(latest: bytes | bytearray) -> bytearray:
    """`ResumeState.latest` (or a slice of it) as a byte per position, set where it is ok."""
    return bytearray(latest).translate(_OK_ONLY)


def error_mask(latest: bytes | bytearray) -> bytearray:
    """`ResumeState.latest` (or a slice of it) as a byte per position, set where it is an
    error."""
    return bytearray(latest).translate(_ERROR_ONLY)


_OK_ONLY = bytes(1 if b == DONE_OK else 0 for b in range(256))
_ERROR_ONLY = bytes(1 if b == DONE_ERROR else 0 for b in range(256))


class Checkpoint:
    """A run's checkpoint folder."""

    def __init__(self, output: Path, *, directory: Path | None = None) -> None:
        """Args:
        directory: the folder, when not OUTPUT.parts/ itself (a shard's, `--engine ray`).
        """
        self.output = output
        self.directory = directory or parts_dir(output)
        self._holding_lock = False
        self._lock_fd: int | None = None

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, checked for shape.

        Raises:
            ConfigError: it is not JSON, or not the shape a run writes (naming the file).
        """
        path = self.manifest_path
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError:
            raise damaged(path, "not JSON") from None
        if not isinstance(data, dict):
            raise damaged(path, "not a JSON object")
        if not isinstance(data.get("fingerprint"), dict):
            raise damaged(path, "no fingerprint")
        for key in ("rows", "limit"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise damaged(path, f"{key!r} is not a whole number")
        return data

    def check_writable(self) -> None:
        """Refuse an output folder (or checkpoint folder) this process cannot write, before
        anything is read or sent: a file is created and removed in each.

        Raises:
            ConfigError: naming the folder and why.
        """
        folder = self.output.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for place in (folder, self.directory):
                if place.is_dir():
                    fd, name = tempfile.mkstemp(dir=place, prefix=".batchrun-probe-")
                    os.close(fd)
                    os.unlink(name)
        except OSError as exc:
            where = exc.filename if isinstance(exc.filename, str) else folder
            if isinstance(where, str) and Path(where).name.startswith(".batchrun-probe-"):
                where = Path(where).parent
            raise ConfigError(
                f"the output folder cannot be written ({exc.strerror}): choose another "
                "output or fix the folder's permissions",
                path=where,
            ) from None

    def manifest_for(self, job: Job, *, identity: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest a run of `job` makes, redacted: no job value reaches it unredacted (it
        may quote a prompt or extra_body).

        Args:
            identity: the input's identity as the scan pass computed it (`InputSummary`);
                hashed here when not given.
        """
        if not identity:
            identity = input_identity(job.input)
        manifest: dict[str, Any] = scrub(
            {"version": 1, "fingerprint": {"input": identity, "job": job.fingerprint()}}
        )
        return manifest

    def open(self, job: Job, *, restart: bool, manifest: dict[str, Any] | None = None) -> None:
        """Create the checkpoint, or check that an existing one belongs to this job.

        Args:
            manifest: `manifest_for(job)`, when the caller has made it already.

        Raises:
            ConfigError: the job changed since the checkpoint was made, and not `restart`.
        """
        wanted = manifest if manifest is not None else self.manifest_for(job)
        if self.exists() and restart:
            self.discard()
        if self.exists():
            found = self.read_manifest()
            fingerprint = found.get("fingerprint")
            old_input = fingerprint.get("input") if isinstance(fingerprint, dict) else None
            if old_input != wanted["fingerprint"]["input"]:
                raise InputError(
                    "the input changed since the checkpoint was made "
                    f"({_input_change(old_input, wanted['fingerprint']['input'])}): its answers "
                    "are for the old rows; put the old file back, or run with --restart to "
                    "discard the checkpoint and start over",
                    path=job.input,
                )
            changes = _describe_change(found.get("fingerprint", {}), wanted["fingerprint"])
            if changes:
                raise ConfigError(
                    "the job changed since its checkpoint was made ("
                    + "; ".join(changes[:5])
                    + "): run with --restart to discard the checkpoint and start over",
                    path=self.directory,
                )
            return
        orphans = [*list_parts(self.directory), *list_journals(self.directory)]
        if orphans:  # results of an unknown job: resuming them could mix two jobs
            raise damaged(self.manifest_path, f"missing, yet {orphans[0].name} is there")
        self.directory.mkdir(parents=True, exist_ok=True)
        wanted["created_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        self._write_manifest(wanted)

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        tmp = self.manifest_path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.manifest_path)

    def record_rows(
        self, rows: int, *, limit: int | None, report: dict[str, Any] | None = None
    ) -> None:
        """Note in the manifest how many input rows this run covers (for `batchrun status`).

        Call it holding the lock: the manifest is rewritten.

        Args:
            report: what `batchrun report` needs to know about the job (the output's
                `batchrun.report` metadata), for a report of the checkpoint before the
                output is written.
        """
        manifest = self.read_manifest()
        wanted = {"rows": rows, "limit": limit} | ({"report": report} if report else {})
        if any(manifest.get(key) != value for key, value in wanted.items()):
            self._write_manifest({**manifest, **wanted})

    def recover(self, *, carried: dict[str, pa.DataType]) -> int:
        """Fold what a stopped or killed run left in its journal into part files, and clear
        the temporary files a killed write left. Call it holding the lock.

        Returns:
            The number of rows recovered from the journal.
        """
        for leftover in self.output.parent.glob(f".{self.output.name}.tmp-*"):
            remove_output(leftover)  # a compaction cut short (a file, or an output directory)
        schema = part_schema(carried)
        # `--engine ray`'s shard folders too: what a killed run did counts before it resumes
        folders = [self.directory, *shard_dirs(self.directory)]
        return sum(recover_journals(folder, schema=schema) for folder in folders)

    def discard(self) -> None:
        """Throw the checkpoint folder away (at the end of a run, or when it held nothing).

        Raises:
            ConfigError: another live run is using it.
        """
        holder = self.lock_holder()
        if holder is not None and not self._holding_lock:
            raise _locked(holder, self.output)
        shutil.rmtree(self.directory, ignore_errors=True)

    def discard_if_empty(self) -> None:
        """Remove the folder if it holds nothing but the lock file (call it holding the lock)."""
        with contextlib.suppress(OSError):
            if [entry.name for entry in self.directory.iterdir()] == [LOCK]:
                self.discard()

    def clear(self) -> None:
        """Empty the checkpoint but keep the lock file (what --restart does, holding the
        lock): removing the folder would let a run starting now take a lock of its own."""
        if not self._holding_lock:
            raise RuntimeError("clear() needs the run lock")
        for entry in self.directory.iterdir():
            if entry.name == LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def lock_holder(self) -> int | None:
        """The pid of the live run using this checkpoint, if any."""
        path = self.directory / LOCK
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_lock(path) or -1  # locked: a run is alive, whatever the file says
        finally:
            os.close(fd)  # closing drops a lock taken just to look
        return None

    def resume_state(self, *, rows: int) -> ResumeState:
        """What is done among the first `rows` positions, reading only the position and status
        columns of each part, oldest first, so that a later result wins.

        One part at a time, in this thread, with pyarrow.parquet alone: no pyarrow.compute or
        pyarrow.dataset (their imports cost a small run ~50 ms) and no thread pool for files
        of a few hundred rows (issue 12); memory stays that of one part.
        """
        latest = bytearray(rows)
        parts = list_parts(self.directory)
        if not parts:
            return ResumeState(latest, 0, 0)
        import pyarrow.parquet as pq

        spent: list[float] = []
        for part in parts:
            try:
                file = pq.ParquetFile(part)
                # parts written before `_paid_before` existed have none: nothing was counted twice
                paid = PAID_BEFORE_COLUMN in file.schema_arrow.names
                columns = [INDEX_COLUMN, "status", "cost_usd"]
                table = file.read(
                    columns=[*columns, PAID_BEFORE_COLUMN] if paid else columns, use_threads=False
                )
            except Exception:  # pyarrow raises several types for a bad file
                check_parts([part])
                raise
            costs = [cost for cost in table["cost_usd"].to_pylist() if cost is not None]
            if paid:
                costs += [-cost for cost in table[PAID_BEFORE_COLUMN].to_pylist() if cost]
            spent.append(math.fsum(costs))
            positions = table[INDEX_COLUMN].to_pylist()
            for position, status in zip(positions, table["status"].to_pylist(), strict=True):
                if position < rows:
                    latest[position] = DONE_OK if status == "ok" else DONE_ERROR
        rows_ok = latest.count(DONE_OK)
        return ResumeState(latest, rows_ok + latest.count(DONE_ERROR), rows_ok, math.fsum(spent))

    def acquire_lock(self) -> None:
        """Refuse a second run on the same output while the first is alive.

        The lock is an flock on the lock file, held for the whole run: the kernel drops it
        when the process ends, however it ends, so a killed run leaves no stale lock and two
        runs starting at once cannot both take it. The pid inside is for `status`.
        """
        path = self.directory / LOCK
        for attempt in range(20):
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt < 4:  # `status` may hold it for a moment, just to look
                    time.sleep(0.02)
                    continue
                raise _locked(read_lock(path), self.output) from None
            try:
                if not _same_file(fd, path):  # a finishing run removed the folder meanwhile
                    os.close(fd)
                    continue
                os.ftruncate(fd, 0)
                os.write(fd, orjson.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            except BaseException:
                os.close(fd)
                raise
            self._lock_fd = fd
            self._holding_lock = True
            return
        raise ConfigError("could not take the run lock", path=path)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        self._holding_lock = False


def damaged(path: Path, what: str) -> ConfigError:
    """The error for a checkpoint file that does not read as a run wrote it."""
    return ConfigError(
        f"the checkpoint is damaged ({what}): run with --restart to discard it and start over",
        path=path,
    )


#: the columns resume and status read from every part file
PART_COLUMNS = (INDEX_COLUMN, "status", "cost_usd", "error_class")


def check_parts(parts: list[Path]) -> None:
    """Open each part file's footer and schema, to name the one that does not read.

    Raises:
        ConfigError: the first part file that is not Parquet or lacks a needed column.
    """
    import pyarrow.parquet as pq

    for part in parts:
        try:
            names = pq.read_schema(part).names
        except FileNotFoundError:
            continue  # a finishing run removed it meanwhile
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise damaged(part, f"not a readable Parquet file: {exc}") from None
        missing = [name for name in PART_COLUMNS if name not in names]
        if missing:
            raise damaged(part, f"no {missing[0]!r} column")


def _same_file(fd: int, path: Path) -> bool:
    """Whether an open descriptor is still the file at `path` (not one since deleted)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _locked(holder: int | None, output: Path) -> ConfigError:
    who = f"another run (pid {holder})" if holder and holder > 0 else "another run"
    return ConfigError(f"{who} is using this output; wait for it or stop it first", path=output)


def read_lock(path: Path) -> int | None:
    """The pid in a lock file, or None if there is no readable lock."""
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    pid = data.get("pid") if isinstance(data, dict) else None
    if not isinstance(pid, int):
        return None
    if data.get("host") not in (None, socket.gethostname()):
        return None
    return pid
