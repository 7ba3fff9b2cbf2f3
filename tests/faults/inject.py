"""`python inject.py POINT N ARGS...`: run `metalearn ARGS...` in this process and SIGKILL it at
an exact moment, counted from this process's start:

  save      the N-th checkpoint write, with half of its bytes in the temporary file
  rename    the N-th checkpoint write, between moving the old file aside and renaming the new one
  validate  the N-th validation, after half of its episodes
  test      the final test, after half of its episodes

The kill is real (the kernel's SIGKILL, nothing cleans up); only the moment is chosen."""

import io
import os
import signal
import sys

import torch

from metalearn import cli
from metalearn.records import results as report
from metalearn.train import validate

POINT, N = sys.argv[1], int(sys.argv[2])
_calls = 0


def _due() -> bool:
    global _calls
    _calls += 1
    return _calls == N


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _half_written(original):
    def save(obj, f, *args, **kwargs):
        if not _due():
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        _die()

    return save


def _between_renames(original):
    def replace(src, dst, *args, **kwargs):
        result = original(src, dst, *args, **kwargs)
        if str(dst).endswith(".prev.pt") and _due():
            _die()  # the old checkpoint is now <name>.prev.pt; the new one is still a .tmp
        return result

    return replace


def _halfway(original, every_call: bool):
    def run_episodes(run, split, *, episodes, **kwargs):
        if every_call or _due():
            original(run, split, episodes=max(1, episodes // 2), **kwargs)
            _die()
        return original(run, split, episodes=episodes, **kwargs)

    return run_episodes


if POINT == "save":
    torch.save = _half_written(torch.save)
elif POINT == "rename":
    os.replace = _between_renames(os.replace)
elif POINT == "validate":
    validate.run_episodes = _halfway(validate.run_episodes, every_call=False)
elif POINT == "test":
    report.run_episodes = _halfway(report.run_episodes, every_call=True)
else:
    sys.exit(f"unknown injection point {POINT!r}; use save, rename, validate or test")
sys.argv = ["metalearn", *sys.argv[3:]]
cli.main()
