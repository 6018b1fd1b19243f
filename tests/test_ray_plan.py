"""The shard plan of `--engine ray` (no Ray needed: the plan is files and arithmetic)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchrun.ray_engine import plan_shards
from batchrun.sources import iter_batches
from tests.conftest import write_jsonl


def _jsonl(tmp_path: Path, rows: int) -> Path:
    return write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "p"} for i in range(rows)])


def test_shards_cover_every_position_once(tmp_path: Path) -> None:
    """The shards are contiguous, in order, and cover [0, positions) exactly."""
    shards = plan_shards(tmp_path, path=_jsonl(tmp_path, 37), positions=37, variants=1, workers=2)
    assert shards[0].start == 0 and shards[-1].end == 37
    assert all(a.end == b.start for a, b in zip(shards, shards[1:], strict=False))


def test_plan_is_kept_for_a_resumed_run(tmp_path: Path) -> None:
    """A later run reads the plan the first wrote, whatever its number of workers."""
    path = _jsonl(tmp_path, 37)
    first = plan_shards(tmp_path, path=path, positions=37, variants=1, workers=2)
    assert plan_shards(tmp_path, path=path, positions=37, variants=1, workers=7) == first


def test_plan_grows_after_a_limited_run(tmp_path: Path) -> None:
    """A run past a --limit run's rows keeps its shards and adds shards for the rest."""
    path = _jsonl(tmp_path, 40)
    limited = plan_shards(tmp_path, path=path, positions=10, variants=1, workers=2)
    full = plan_shards(tmp_path, path=path, positions=40, variants=1, workers=2)
    assert full[: len(limited)] == limited and full[-1].end == 40


def test_a_rows_sweep_variants_stay_in_one_shard(tmp_path: Path) -> None:
    """With a sweep, shard bounds fall between input rows, never between a row's variants."""
    shards = plan_shards(tmp_path, path=_jsonl(tmp_path, 9), positions=27, variants=3, workers=2)
    assert all(s.start % 3 == 0 and s.end % 3 == 0 for s in shards)


def test_parquet_shards_begin_at_row_groups(tmp_path: Path) -> None:
    """A Parquet input's shards begin at its row groups where they fit."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(60)), "prompt": ["p"] * 60}), path, row_group_size=10)
    shards = plan_shards(tmp_path, path=path, positions=60, variants=1, workers=2)
    assert [s.start % 10 for s in shards] == [0] * len(shards)


def test_a_shard_reads_from_its_first_row(tmp_path: Path) -> None:
    """Reading from a shard's recorded start yields its own rows first, at their positions."""
    path = _jsonl(tmp_path, 37)
    shard = plan_shards(tmp_path, path=path, positions=37, variants=1, workers=2)[2]
    batches = iter_batches(path, start=shard.begins, limit=shard.end)
    rows = [row for batch in batches for row in batch]
    assert [r.index for r in rows] == list(range(shard.start, shard.end))
    assert [r.data["id"] for r in rows] == list(range(shard.start, shard.end))
