"""Tests for metalearn.records.logger: metrics.jsonl, and real offline W&B runs read back."""

import json
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from metalearn.errors import ConfigError, MetalearnError
from metalearn.records.logger import Logger, LoggerConfig, flatten

CONFIG = {"algo": {"name": "maml", "inner_lr": 0.4}, "data": {"ways": 5, "shots": 1}, "seed": 0}
RESULTS = {
    "metric": "accuracy",
    "test": {"accuracy": {"mean": 0.987, "ci95": 0.004}, "episodes": 1000},
    "val": {"accuracy": {"mean": 0.99, "ci95": 0.004}, "best_iteration": 4000},
}


def metrics_at(step: int) -> dict[str, float]:
    """Deterministic metrics for a step, so a resumed run can be compared with a straight one."""
    return {"train/loss": 1.0 / (step + 1), "train/query_acc": step / 10}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl, parsed."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def read_wandb_records(path: Path, wait: float = 60.0) -> list[Any]:
    """Decode a finished run's .wandb transaction log into wandb_internal_pb2.Record messages.

    wandb 0.31 has no Python reader (wandb.sdk.internal.datastore is gone; wandb-core writes
    the file), so this follows the format: a 7-byte header (b":W&B", magic 0xBEE1, version 0),
    then LevelDB-log 32 KiB blocks of chunks, each with a 7-byte header (CRC-32 of type byte
    plus data, length, type: 1 full, 2 first, 3 middle, 4 last); a block tail too short for a
    chunk header is zero padding. Chunks join into one serialized Record protobuf.

    wandb-core writes the file in its own process and may still be flushing it when
    `run.finish()` has returned (seen in CI on a loaded machine: a log holding only its
    header), so this reads until the run's last record, `exit`, is there, for up to `wait`
    seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        records = decode_wandb_log(path.read_bytes())
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in records]
            raise AssertionError(f"{path} has no exit record after {wait} s: {kinds}")
        time.sleep(0.1)


def decode_wandb_log(data: bytes) -> list[Any]:
    """The complete records of a .wandb log's bytes; a chunk still being written is left out."""
    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    assert struct.unpack("<4sHB", data[:header]) == (b":W&B", 0xBEE1, 0)
    records, payload, pos = [], b"", header
    while pos + header <= len(data):
        if block - pos % block < header:
            pos += block - pos % block  # padding at the end of a block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if kind == 0 or pos + header + length > len(data):
            break  # zeros after the last record, or a chunk not yet fully written
        chunk = data[pos : pos + header + length][header:]
        pos += header + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
    return records


def as_dict(items: Any) -> dict[str, Any]:
    """Items of a history, summary or config record as a dict, nesting multi-part keys."""
    # wandb-core stores a logged dict value (an image's metadata, say) as one item per leaf,
    # keyed by its path: nested_key = ["plots/curve", "width"].
    tree: dict[str, Any] = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else item.nested_key
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = json.loads(item.value_json)
    return tree


def wandb_contents(run_dir: Path) -> dict[str, Any]:
    """The run, config, history rows (by step) and final summary of each offline run, in order."""
    runs = []

    # offline-run-<time>-<id>, and -<id>-1, -2... for a resume within the same second
    def started(path: Path) -> tuple[str, int]:
        stem, _, count = path.parent.name.partition(f"-{path.stem.removeprefix('run-')}")
        return stem, int(count.lstrip("-") or 0)

    for run_path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=started):
        run, config, history, summary = None, {}, {}, {}
        for record in read_wandb_records(run_path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config = as_dict(run.config.update)
            elif kind == "history":
                row = as_dict(record.history.item)
                history[row["_step"]] = row
            elif kind == "summary":
                summary.update(as_dict(record.summary.update))
        runs.append({"run": run, "config": config, "history": history, "summary": summary})
    return runs


def no_fallback_warnings(caught: list[warnings.WarningMessage]) -> bool:
    """Whether the logger never had to turn W&B off."""
    return not [w for w in caught if "W&B logging is off" in str(w.message)]


@pytest.fixture
def wandb_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline by default (no account, no network), whatever the shell has set."""
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT", "WANDB_SHOW_INFO"):
        monkeypatch.delenv(name, raising=False)


def test_offline_run_round_trips(
    tmp_path: Path, wandb_env: None, capfd: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "curve.png"
    Image.new("RGB", (8, 8), "red").save(png)
    cfg = LoggerConfig(project="test-project", group="sweep-1", tags=["unit"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Logger(cfg, tmp_path, run_name="maml-omniglot-s0", config=CONFIG) as logger:
            assert logger.wandb_enabled
            for step in range(3):
                logger.log(metrics_at(step), step=step)
            logger.log_summary(RESULTS)
            logger.log_images([png])
        logger.close()  # idempotent after the context manager closed it
    assert no_fallback_warnings(caught)
    # Quiet: none of W&B's banners ("Tracking run with wandb ...", the run summary).
    assert "wandb:" not in capfd.readouterr().err

    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": s, **metrics_at(s)} for s in range(3)
    ]
    [run] = wandb_contents(tmp_path)
    run_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert run["run"].run_id == run_id
    assert (run["run"].project, run["run"].display_name) == ("test-project", "maml-omniglot-s0")
    assert (run["run"].run_group, list(run["run"].tags)) == ("sweep-1", ["unit"])
    assert {k: v for k, v in run["config"].items() if k != "_wandb"} == CONFIG
    assert sorted(run["history"]) == [0, 1, 2]
    for step, row in run["history"].items():
        assert {k: row[k] for k in metrics_at(step)} == metrics_at(step)
    # The image joins the last step's row; its file is copied into the offline run.
    image = run["history"][2]["plots/curve"]
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (8, 8)
    assert list(tmp_path.glob(f"wandb/offline-run-*/files/{image['path']}"))
    assert {k: run["summary"][k] for k in flatten(RESULTS)} == flatten(RESULTS)


def test_resume_truncates_then_appends_and_continues_the_wandb_run(
    tmp_path: Path, wandb_env: None
) -> None:
    cfg = LoggerConfig()
    with Logger(cfg, tmp_path, run_name="r", config=CONFIG) as logger:
        for step in range(5):
            logger.log(metrics_at(step), step=step)
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "train/lo')  # the line a crash cut in half
    run_id = (tmp_path / "wandb_run_id.txt").read_text()

    # Resume from a checkpoint taken at step 2: steps 3-5 are recomputed.
    with Logger(cfg, tmp_path, run_name="r", config=CONFIG, resume_step=2) as logger:
        assert read_jsonl(tmp_path / "metrics.jsonl") == [
            {"step": s, **metrics_at(s)} for s in range(3)
        ]
        for step in range(3, 6):
            logger.log(metrics_at(step), step=step)

    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": s, **metrics_at(s)} for s in range(6)
    ]
    assert (tmp_path / "wandb_run_id.txt").read_text() == run_id
    first, resumed = wandb_contents(tmp_path)  # offline, a resume writes a second directory
    assert first["run"].run_id == resumed["run"].run_id == run_id.strip()
    assert sorted(resumed["history"]) == [3, 4, 5]


def test_metrics_jsonl_is_written_and_flushed_every_call(tmp_path: Path) -> None:
    logger = Logger(LoggerConfig(kind="none"), tmp_path, run_name="r", config=CONFIG)
    logger.log({"train/loss": np.float32(0.25), "perf/tasks": 32}, step=0)
    # Readable before close: a crash loses at most the line being written.
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 0, "train/loss": 0.25, "perf/tasks": 32}
    ]
    logger.log({"train/loss": 0.125}, step=10)
    logger.close()
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[1] == {"step": 10, "train/loss": 0.125}

    # A fresh (not resumed) run in the same directory starts a new file.
    with Logger(LoggerConfig(kind="none"), tmp_path, run_name="r", config=CONFIG) as logger:
        logger.log({"train/loss": 1.0}, step=0)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "train/loss": 1.0}]


def test_resume_rejects_a_corrupt_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(MetalearnError, match=r"metrics.jsonl:2 is not a metrics line"):
        Logger(LoggerConfig(kind="none"), tmp_path, run_name="r", config={}, resume_step=5)


def test_kind_none_never_imports_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Logger(LoggerConfig(kind="none"), tmp_path, run_name="r", config=CONFIG) as logger:
            logger.log({"train/loss": 1.0}, step=0)
            logger.log_summary(RESULTS)
            logger.log_images([tmp_path / "missing.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]

    # The same state with kind='wandb' does try the import (so the check above has teeth),
    # and a missing wandb is one more failure that only turns W&B off.
    with pytest.warns(RuntimeWarning, match="W&B logging is off"):
        logger = Logger(LoggerConfig(), tmp_path / "b", run_name="r", config=CONFIG)
    assert not logger.wandb_enabled
    logger.close()


def test_wandb_init_failure_warns_once_and_keeps_metrics_jsonl(
    tmp_path: Path, wandb_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "bogus")  # logger.mode unset: wandb.init rejects this
    with pytest.warns(
        RuntimeWarning, match=r"(?s)wandb.(setup|init) failed .*metrics\.jsonl"
    ) as caught:
        logger = Logger(LoggerConfig(), tmp_path, run_name="r", config=CONFIG)
        assert not logger.wandb_enabled
        for step in range(3):
            logger.log(metrics_at(step), step=step)
        logger.log_summary(RESULTS)
        logger.close()
    assert len(caught) == 1
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": s, **metrics_at(s)} for s in range(3)
    ]
    assert not (tmp_path / "wandb_run_id.txt").exists()


def test_wandb_failure_mid_run_turns_wandb_off(tmp_path: Path, wandb_env: None) -> None:
    # mode='disabled' runs the real wandb API without a service process, so this stays fast.
    logger = Logger(LoggerConfig(mode="disabled"), tmp_path, run_name="r", config=CONFIG)
    logger.log(metrics_at(0), step=0)
    with pytest.warns(RuntimeWarning, match="image logging failed") as caught:
        logger.log_images([tmp_path / "missing.png"])  # wandb.Image raises FileNotFoundError
        logger.log(metrics_at(1), step=1)
        logger.log_summary(RESULTS)
        logger.close()
    assert len(caught) == 1 and not logger.wandb_enabled
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": s, **metrics_at(s)} for s in (0, 1)]


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [("kind", "tensorboard", "'wandb', 'none'"), ("mode", "dryrun", "'online', 'offline'")],
)
def test_invalid_kind_or_mode_is_a_config_error(field: str, value: str, valid: str) -> None:
    with pytest.raises(ConfigError, match=f"logger.{field}='{value}'.*{valid}"):
        LoggerConfig(**{field: value})


def test_flatten_joins_nested_keys_with_slashes() -> None:
    assert flatten({"test": {"accuracy": {"mean": 0.9}, "episodes": 600}, "seed": 0}) == {
        "test/accuracy/mean": 0.9,
        "test/episodes": 600,
        "seed": 0,
    }
