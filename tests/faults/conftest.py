"""The faults suite's tally: each test counts the faults it injected once it has checked that the
run survived them (an identical result or a clear error, nothing lost); pytest prints the counts
at the end of the run, and the README's "Reliability" section quotes those lines."""

import collections

import pytest

# tally key -> what the printed line says of it
KINDS = {
    "sigkill": "SIGKILLs of real training runs, each resumed to the identical result",
    "sigkill_random": "  of which at random moments (in start-up, training or anything else)",
    "sigkill_checkpoint": "  of which halfway through a checkpoint write or between its renames",
    "sigkill_eval": "  of which halfway through a validation or the final test",
    "stop_signal": "SIGTERM/SIGINT stops, resumed to the identical result",
    "checkpoint_corrupt": "damaged checkpoints, fallen back to the previous good one or refused",
    "corrupt_input": "corrupted or wrong input files, each a clear error naming the file",
    "disk": "disk-full or unwritable outputs, a clear error or a warning, nothing lost",
    "nonfinite": "NaN/Inf faults, stopped or skipped by policy with the iteration named",
    "wandb": "W&B outages (unreachable, hanging, failing), training went on",
    "oom": "out-of-memory faults, a clear error with the peak memory",
    "invalid_config": "invalid configs, each refused at start-up naming the key and range",
    "valid_config": "valid random configs, each built",
    "determinism": "repeated or resumed runs compared, metrics identical",
}
TALLY: collections.Counter = collections.Counter()


@pytest.fixture
def tally() -> collections.Counter:
    """Add to a key of KINDS after the assertions that show the fault was survived."""
    return TALLY


def pytest_terminal_summary(terminalreporter) -> None:
    if not TALLY:
        return
    unknown = set(TALLY) - set(KINDS)
    assert not unknown, f"tally keys not in KINDS: {unknown}"
    terminalreporter.section("faults injected and survived")
    for key, words in KINDS.items():
        if TALLY[key]:
            terminalreporter.write_line(f"{TALLY[key]:5d}  {words}")
