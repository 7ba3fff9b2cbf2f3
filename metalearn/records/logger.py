"""Run logging: metrics.jsonl always, plus a W&B run (offline unless told otherwise).

Over 300 lines because W&B's failure modes (unreachable, hanging, failing mid-run, a resumed
run's truncated history) are each handled here so that training never stops for logging.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from metalearn.errors import ConfigError, MetalearnError

KINDS = ("wandb", "none")
MODES = ("online", "offline", "disabled")
METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "wandb_run_id.txt"


@dataclass
class LoggerConfig:
    """How runs are logged: metrics.jsonl always; W&B when kind == 'wandb'."""

    kind: str = "wandb"  # 'wandb' or 'none' (metrics.jsonl only)
    project: str = "metalearn"  # W&B project
    entity: str | None = None  # W&B user or team; None: the account's default
    mode: str | None = None  # online|offline|disabled; None: $WANDB_MODE, else offline
    group: str | None = None  # W&B group (the runs of one sweep share one)
    tags: list[str] = field(default_factory=list)  # W&B tags
    # seconds the W&B server has to answer at start-up; past that (or refused, or failing) the
    # run logs to an offline W&B run instead, for `wandb sync` later
    timeout: float = 5.0
    finish_timeout: float = 120.0  # seconds for the last uploads; what is left stays for sync

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"logger.kind={self.kind!r} is unknown; use one of {list(KINDS)}")
        if self.mode is not None and self.mode not in MODES:
            raise ConfigError(
                f"logger.mode={self.mode!r} is unknown; use one of {list(MODES)} "
                "or leave it unset (null) to use $WANDB_MODE, else 'offline'"
            )
        for key in ("timeout", "finish_timeout"):
            value = getattr(self, key)
            if not 0 < value < math.inf:
                raise ConfigError(f"logger.{key} must be a positive number of seconds, got {value}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict into 'a/b/c' keys (the W&B convention for sections)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _read_kept_lines(path: Path, resume_step: int) -> list[str]:
    """Lines of a metrics.jsonl whose step is <= resume_step."""
    kept = []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), start=1):
        if not line.endswith("\n"):
            break  # a last line cut off by the crash we are resuming from
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise MetalearnError(
                f"{path}:{number} is not a metrics line ({error}); "
                "fix or delete the file, or start a fresh run instead of resuming"
            ) from error
        if step <= resume_step:
            kept.append(line)
    return kept


def server_trouble(url: str, timeout: float) -> str | None:
    """What is wrong with the W&B server at `url` (refused, silent past `timeout` seconds,
    failing with HTTP 5xx), or None when it answers; one request, so a dead server costs at
    most `timeout` seconds instead of W&B's own minutes of retries."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/healthz", timeout=timeout):
            return None
    except urllib.error.HTTPError as error:
        return None if error.code < 500 else f"answers HTTP {error.code} ({error.reason})"
    except TimeoutError:
        return f"did not answer within {timeout:g} s"
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, TimeoutError):
            return f"did not answer within {timeout:g} s"
        return f"is unreachable ({reason})"
    except (OSError, ValueError) as error:  # a reset connection, a malformed URL
        return f"is unreachable ({type(error).__name__}: {error})"


class Logger:
    """Write metrics to run_dir/metrics.jsonl and, when configured, to a W&B run."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        *,
        run_name: str,
        config: dict[str, Any],
        resume_step: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None and self.metrics_path.exists():
            # Drop what was logged after the checkpoint we resume from, so the file ends up
            # identical to an uninterrupted run's; write-then-rename so a crash here loses nothing.
            tmp = self.metrics_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(_read_kept_lines(self.metrics_path, resume_step)))
            os.replace(tmp, self.metrics_path)
        # A fresh run starts a fresh file; a resumed one continues the truncated one. Unbuffered
        # bytes: each write's outcome is known, so a full disk loses nothing (see _append).
        self._file = self.metrics_path.open("ab" if resume_step is not None else "wb", buffering=0)
        self._unwritten = b""  # lines the disk refused, written before the next ones
        self._last_step: int | None = resume_step
        self._run: Any = None  # the wandb Run; None when W&B is off
        self._closed = False
        self._write_failed = False
        if cfg.kind == "wandb":
            self._start_wandb(run_name, config, resume=resume_step is not None)

    @property
    def wandb_enabled(self) -> bool:
        """Whether metrics still go to W&B (False after a failure or with kind='none')."""
        return self._run is not None

    def _start_wandb(self, run_name: str, config: dict[str, Any], *, resume: bool) -> None:
        """Start (or, when resuming, continue) the W&B run; on failure carry on without it."""
        mode = self.cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume and id_file.exists() else None
        try:
            import wandb  # lazy: runs with kind='none' never pay for (or need) wandb

            # show_info=False hides W&B's banners but keeps its warnings (a dropped step, say)
            # and errors, which silent=True would hide too. It must go to wandb.setup: the
            # terminal is configured once per process, so init's settings come too late.
            setup = wandb.setup(settings=wandb.Settings(show_info=False, mode=mode))
            if mode == "online":
                url = setup.settings.base_url
                trouble = server_trouble(url, self.cfg.timeout)
                if trouble:
                    self._go_offline(f"the W&B server {url} {trouble}")
                    mode = "offline"
                    self._setup_offline(wandb)
        except Exception as error:  # any failure: see _wandb_failed
            self._wandb_failed("wandb.setup", error, stacklevel=4)  # point at Logger(...)
            return
        settings = wandb.Settings(
            init_timeout=6 * self.cfg.timeout, finish_timeout=self.cfg.finish_timeout
        )
        while True:
            try:
                self._run = wandb.init(
                    project=self.cfg.project,
                    entity=self.cfg.entity,
                    group=self.cfg.group,
                    tags=list(self.cfg.tags),
                    name=run_name,
                    config=config,
                    dir=self.run_dir,  # the offline run lands in run_dir/wandb/
                    mode=mode,
                    id=run_id,
                    resume="allow" if run_id else None,
                    settings=settings,
                )
                if mode != "disabled":  # a disabled run's id names nothing worth resuming
                    id_file.write_text(self._run.id + "\n")
                return
            except Exception as error:  # any failure: see _wandb_failed
                if mode != "online":
                    self._wandb_failed("wandb.init", error, stacklevel=5)  # at Logger(...)
                    return
                self._go_offline(f"wandb.init failed ({type(error).__name__}: {error})")
                mode = "offline"
                try:
                    self._setup_offline(wandb)
                except Exception as again:  # any failure: see _wandb_failed
                    self._wandb_failed("wandb.setup", again, stacklevel=5)  # at Logger(...)
                    return

    @staticmethod
    def _setup_offline(wandb: Any) -> None:
        """Set W&B up again offline: an online set-up would try the server again at exit."""
        wandb.teardown()
        wandb.setup(settings=wandb.Settings(show_info=False, mode="offline"))

    def _go_offline(self, why: str) -> None:
        folder = self.run_dir / "wandb"
        warnings.warn(
            f"{why}; this run logs to an offline W&B run in {folder} instead (and to "
            f"{self.metrics_path}): upload it later with `wandb sync {folder}`",
            RuntimeWarning,
            stacklevel=5,  # at Logger(...)
        )

    def _wandb_failed(self, action: str, error: Exception, stacklevel: int = 3) -> None:
        """Turn W&B off for the rest of the run, saying so once (at the caller's line)."""
        # Broad excepts are right here and only here: W&B is a mirror of metrics.jsonl, so no
        # failure of it (network, disk, a bug in wandb) may stop a training run.
        warnings.warn(
            f"{action} failed ({type(error).__name__}: {error}); W&B logging is off for this "
            f"run, local logs continue in {self.metrics_path}",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
        run, self._run = self._run, None
        if run is not None and action != "wandb.finish":
            try:  # best effort: close the W&B run as failed rather than leave it dangling
                run.finish(exit_code=1)
            except Exception:  # already warned; W&B is off either way
                pass

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append {"step": step, **metrics} to metrics.jsonl and log the metrics to W&B."""
        # float() turns 0-d tensors and numpy scalars into JSON numbers; ints stay ints.
        values = {k: v if isinstance(v, int | float) else float(v) for k, v in metrics.items()}
        self._append(json.dumps({"step": step, **values}) + "\n")  # a crash loses that line only
        self._last_step = step
        if self._run is not None:
            try:
                self._run.log(values, step=step)
            except Exception as error:  # any failure: see _wandb_failed
                self._wandb_failed("wandb.log", error)

    def _append(self, line: str) -> None:
        """Write a line after any the disk refused before; on failure (disk full, say) keep them
        in memory, warn once and let training go on: the checkpoints hold what matters."""
        self._unwritten += line.encode()
        try:
            while self._unwritten:
                written = self._file.write(self._unwritten)
                self._unwritten = self._unwritten[written:]
        except OSError as error:
            if not self._write_failed:
                warnings.warn(
                    f"cannot write {self.metrics_path} ({error}); training goes on, the lines "
                    f"are kept in memory and written when the disk takes them again: free some "
                    f"space on it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            self._write_failed = True
            return
        if self._write_failed:
            warnings.warn(f"{self.metrics_path} is written again", RuntimeWarning, stacklevel=3)
            self._write_failed = False

    def log_summary(self, results: dict[str, Any]) -> None:
        """Put the final results (nested, like results.json) in the W&B run summary."""
        if self._run is None:
            return  # results.json (written by records/results.py) is the local record
        try:
            self._run.summary.update(flatten(results))
        except Exception as error:  # any failure: see _wandb_failed
            self._wandb_failed("wandb summary update", error)

    def log_images(self, paths: list[Path]) -> None:
        """Log PNG plots to W&B as images under 'plots/<stem>', at the last logged step."""
        if self._run is None or not paths:
            return  # the PNGs themselves stay in run_dir/plots/
        try:
            import wandb

            images = {f"plots/{Path(p).stem}": wandb.Image(str(p)) for p in paths}
            # At the last step logged, since W&B drops rows whose step goes backwards.
            self._run.log(images, step=self._last_step)
        except Exception as error:  # any failure: see _wandb_failed
            self._wandb_failed("wandb image logging", error)

    def log_artifact(self, name: str, paths: list[Path], kind: str = "run-results") -> None:
        """Upload files (results.json, plots, the best checkpoint) as one W&B artifact."""
        if self._run is None:
            return  # the files themselves stay in the run directory
        try:
            import wandb

            artifact = wandb.Artifact(name, type=kind)
            for path in paths:
                if Path(path).is_file():
                    artifact.add_file(str(path), name=str(Path(path).relative_to(self.run_dir)))
            self._run.log_artifact(artifact)
        except Exception as error:  # any failure: see _wandb_failed
            self._wandb_failed("wandb artifact upload", error)

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and finish the W&B run (exit_code != 0 marks it failed)."""
        if self._closed:
            return
        self._closed = True
        if self._unwritten:
            self._append("")  # a last try
        if self._unwritten:
            lines = self._unwritten.count(b"\n")
            warnings.warn(
                f"{lines} metrics lines could not be written to {self.metrics_path}; the run's "
                f"checkpoints and results are not affected",
                RuntimeWarning,
                stacklevel=2,
            )
        with contextlib.suppress(OSError):
            self._file.close()
        if self._run is not None:
            try:
                self._run.finish(exit_code=exit_code)
            except Exception as error:  # any failure: see _wandb_failed
                self._wandb_failed("wandb.finish", error)
            self._run = None

    def __enter__(self) -> Logger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)


class NullLogger:
    """The logger of torchrun ranks other than 0: they train, rank 0 writes."""

    wandb_enabled = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_summary(self, results: dict[str, Any]) -> None:
        pass

    def log_images(self, paths: list[Path]) -> None:
        pass

    def log_artifact(self, name: str, paths: list[Path], kind: str = "run-results") -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass
