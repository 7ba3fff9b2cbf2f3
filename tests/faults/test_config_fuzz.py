"""Random override sets against an explicit spec: every invalid one is refused at start-up (in
build_run, before any training) with a ConfigError, or a DataError where only the data set rules
it out, whose message names the key and its allowed range or type; every valid one builds.

The oracle is SPECS below, written out by hand (key -> type, allowed values, the words its error
must contain) plus a few rules across keys; it does not call the code under test to decide."""

import copy
import dataclasses
import functools
import importlib
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from conftest import compose_config, real_data_root
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from metalearn import build
from metalearn.build import build_run
from metalearn.data.images.omniglot import OmniglotConfig, omniglot_tasks
from metalearn.errors import ConfigError, DataError

TALLY = importlib.import_module("faults.conftest").TALLY  # hypothesis cannot take `tally`
# Even without a database, hypothesis caches the constants it finds in source files, when the
# tests are collected, under .hypothesis/: keep that cache out of the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "metalearn-hypothesis")

NAN, INF = math.nan, math.inf
SEEDS = "[0, 2**63)"  # what every seed allows (torch's generators take no more)
OMNIGLOT_EXAMPLES = 20  # images per Omniglot class, in every split
OMNIGLOT_CLASSES = {"train": 4112, "val": 688, "test": 1692}  # Vinyals split, with rotations


@dataclass(frozen=True)
class Rule:
    """One key: its type, the values of that type it allows and the words of its range error;
    `edges` are values of the right type at and around the bounds, `wider` draws more."""

    kind: str  # 'int', 'float', 'bool', 'str', 'list[int]', 'list[float]'; '?': null allowed
    allowed: Callable[[Any], bool]
    words: tuple[str, ...]  # besides the key, in the range error
    edges: tuple
    wider: st.SearchStrategy = st.nothing()
    type_words: str | None = None  # the type error's words if not "must be <kind>"


@dataclass(frozen=True)
class Broken:
    """A rule a drawn config breaks: the error must name one of `keys` and contain `words`."""

    keys: tuple[str, ...]
    words: tuple[str, ...]
    errors: tuple[type, ...] = (ConfigError,)

    def explains(self, error: Exception) -> bool:
        message = str(error)
        named = any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", message) for k in self.keys)
        return isinstance(error, self.errors) and named and all(w in message for w in self.words)


def finite(v) -> bool:
    return math.isfinite(float(v))


def at_least(low: int) -> Callable[[Any], bool]:
    return lambda v: v >= low


def ints(low: int, words: str, *edges: int, kind: str = "int", top: int = 20) -> Rule:
    """An integer key that allows `low` and above."""
    around = (low - 1, low, low + 1, -1, *edges)
    return Rule(kind, at_least(low), (words,), around, st.integers(low - 2, top))


def one_of(kind: str, valid: tuple, invalid: tuple, words: str = "must be one of") -> Rule:
    return Rule(kind, lambda v: v in valid, (words,), valid + invalid)


def rate(kind: str = "float") -> Rule:
    """A learning rate: finite and > 0."""
    edges = (0.0, -0.0, -1e-3, -1, NAN, INF, -INF, 5e-324, 1e308, 1, 3)
    return Rule(kind, lambda v: finite(v) and v > 0, ("positive",), edges, st.floats(1e-6, 10.0))


def int_list(low: int, words: str) -> Rule:
    edges = ([], [low - 1], [low], [low, low - 1, low + 1], [-1], [5, 10])
    wider = st.lists(st.integers(low - 2, 12), max_size=3)
    return Rule("list[int]", lambda v: all(s >= low for s in v), (words,), edges, wider)


def interval() -> Rule:
    """[low, high], finite, low <= high."""
    edges = ([0.1, 5.0], [1.0, 1.0], [5.0, 0.1], [], [1.0], [0.1, 1.0, 5.0], [0.0, INF])
    edges += ([-INF, 1.0], [NAN, 1.0], [1, 2])
    wider = st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=3)
    valid = lambda v: len(v) == 2 and all(finite(x) for x in v) and v[0] <= v[1]  # noqa: E731
    return Rule("list[float]", valid, ("[low, high]",), edges, wider)


SEED = Rule("int", lambda v: 0 <= v < 2**63, (SEEDS,), (0, 1, -1, 2**63 - 1, 2**63, 2**64))
TRAINER_AND_EVAL = {
    "trainer.iterations": ints(1, "must be positive", 10**9),
    "trainer.meta_batch_size": ints(1, "must be positive", 64),
    "trainer.eval_every": ints(1, "must be positive"),
    "trainer.log_every": ints(1, "must be positive"),
    "trainer.max_minutes": Rule(
        "float?", lambda v: finite(v) and v > 0, ("must be positive",), (0.5, 1, 0, -1, NAN, INF)
    ),
    "trainer.lr_decay_every": ints(1, "must be positive", kind="int?"),
    "trainer.lr_decay": Rule(
        "float",
        lambda v: 0 < v <= 1,
        ("(0, 1]",),
        (0, 0.0, 1, 1.0, 1.0000001, 2, -0.5, NAN, INF, -INF, 5e-324),
        st.floats(-0.5, 1.5),
    ),
    "trainer.min_lr": Rule(
        "float",
        lambda v: finite(v) and v >= 0,
        (">= 0",),
        (0, 0.0, -0.0, -1e-9, -1, NAN, INF, -INF, 1e-4),
        st.floats(-1e-3, 1e-2),
    ),
    "trainer.lr_schedule": one_of(
        "str?", ("constant", "step", "cosine", "linear"), ("Step", "exp", "")
    ),
    "trainer.nonfinite": one_of("str", ("stop", "skip"), ("Skip", "ignore", "")),
    "trainer.max_skipped": ints(0, ">= 0"),
    "eval.episodes": ints(1, "must be positive"),
    "eval.val_episodes": ints(1, "must be positive"),
    "eval.batch_size": ints(1, "must be positive"),
    "eval.query": ints(1, "must be positive", kind="int?", top=16),
    "eval.shots": int_list(1, ">= 1"),
    "eval.steps": int_list(0, ">= 0"),
    "eval.seed": SEED,
    "seed": dataclasses.replace(SEED, type_words=SEEDS),
    # threads is process-wide: the only valid value drawn leaves it at 1
    "hardware.threads": Rule("int?", at_least(1), ("must be positive",), (1, 0, -3)),
}
BILEVEL = {
    "algo.inner_lr": rate(),
    "algo.test_inner_lr": rate("float?"),
    "algo.outer_lr": rate(),
    "algo.inner_steps": ints(1, "at least 1", 10**6, top=6),
    "algo.test_inner_steps": ints(0, ">= 0", kind="int?", top=6),
    "algo.first_order": Rule("bool", lambda v: True, (), (True, False)),
    "algo.train_query": ints(1, "must be positive", kind="int?", top=21),
}
OMNIGLOT_SHAPE = {
    "data.ways": ints(2, ">= 2", 688, 689, 1692, 4113, top=8),
    "data.shots": ints(1, "must be positive", 19, 20, 21, top=21),
    "data.query": ints(1, "must be positive", 19, 20, 21, top=21),
    "algo.train_ways": ints(2, ">= 2", 60, 4112, 4113, kind="int?", top=8),
}
# base -> (overrides, key -> rule); unknown keys are drawn separately (UNKNOWN)
SPECS: dict[str, tuple[list[str], dict[str, Rule]]] = {
    "maml_sinusoid": (
        ["debug=smoke", "hardware.threads=1"],
        {
            **TRAINER_AND_EVAL,
            **BILEVEL,
            "data.ways": one_of("int", (1,), (0, 2, -1), "must be 1"),
            "data.shots": ints(1, "must be positive", 10**5, top=30),
            "data.query": ints(1, "must be positive", top=30),
            "data.amplitude": interval(),
            "data.phase": interval(),
            "data.x_range": interval(),
            "algo.train_ways": one_of("int?", (1,), (0, 2, -1), "must be 1"),
            "algo.checkpoint": Rule("bool", lambda v: True, (), (True, False)),
            "model.hidden_sizes": Rule(
                "list[int]",
                lambda v: len(v) > 0 and all(h >= 1 for h in v),
                ("positive widths",),
                ([], [0], [1], [40, 40], [40, -1]),
                st.lists(st.integers(-1, 48), max_size=3),
            ),
        },
    ),
    "protonet_omniglot": (
        ["debug=smoke", "hardware.threads=1", "algo=protonet", "data=omniglot"],
        {
            **TRAINER_AND_EVAL,
            **OMNIGLOT_SHAPE,
            "data.split": one_of("str", ("vinyals",), ("Vinyals", "ravi", ""), "not an Omniglot"),
            "algo.outer_lr": rate(),
            "algo.train_query": BILEVEL["algo.train_query"],
            "model.hidden": ints(1, "must be positive", top=16),
            "model.pooled_blocks": Rule("int", lambda v: 0 <= v <= 4, ("0..4",), (-1, 0, 4, 5)),
            # any other size decodes the images anew (seconds): only the default is valid here
            "data.image_size": Rule("int", at_least(1), ("must be positive",), (28, 0, -1)),
        },
    ),
    "maml_omniglot": (
        ["debug=smoke", "hardware.threads=1", "data=omniglot"],
        {
            **TRAINER_AND_EVAL,
            **BILEVEL,
            **OMNIGLOT_SHAPE,
            "data.split_seed": SEED,
            "algo.bn_mode": one_of("str", ("transductive", "running", "per_step"), ("batch", "")),
        },
    ),
}
# keys that rules across keys tie together: half the override sets draw from these
SHAPE = ["data.ways", "data.shots", "data.query", "algo.train_ways", "algo.train_query"]
TOGETHER = {
    "maml_sinusoid": ["trainer.lr_schedule", "trainer.lr_decay_every", "algo.checkpoint"],
    "protonet_omniglot": [*SHAPE, "eval.shots", "eval.query"],
    "maml_omniglot": [*SHAPE, "eval.shots", "eval.query"],
}
UNKNOWN = ["data.color", "algo.lr", "trainer.epochs", "eval.folds", "model.depth", "colour"]
STRINGS = ["3", "abc", "", "nan", "None"]


def wrong_types(kind: str) -> tuple:
    """Values of the wrong type for `kind` (bools are not ints, ints are floats)."""
    base = kind.rstrip("?")
    others = [*STRINGS, [1], {"a": 1}]
    if base != "bool":
        others += [True, False]
    if base in ("int", "bool", "str"):
        others += [2.0, 1.5, NAN, INF]
    if base in ("bool", "str"):
        others += [0, 1]
    if base == "float":
        others += [10**400]  # an int too large for a float
    if base.startswith("list"):
        others = [3, "abc", 1.5, True, ["x"], [1, None], [[1]]]
    if not kind.endswith("?"):
        others.append(None)
    return tuple(others)


def has_type(kind: str, value: Any) -> bool:
    base = kind.rstrip("?")
    if value is None:
        return kind.endswith("?")
    if base == "int":
        return type(value) is int
    if base == "float":
        return type(value) is float or (type(value) is int and abs(value) <= sys.float_info.max)
    if base in ("bool", "str"):
        return type(value) is {"bool": bool, "str": str}[base]
    element = {"list[int]": "int", "list[float]": "float"}[base]
    return isinstance(value, list) and all(has_type(element, v) for v in value)


def type_words(rule: Rule, value: Any) -> str:
    if rule.type_words:
        return rule.type_words
    base = rule.kind.rstrip("?")
    if base.startswith("list"):
        return "must be a list" if not isinstance(value, list) else f"must be {base[5:-1]}"
    return f"must be {base}"


def broken_keys(rules: dict[str, Rule], overrides: dict[str, Any]) -> list[Broken]:
    """The one-key rules the overrides break: unknown key, wrong type, value out of range."""
    broken = []
    for key, value in overrides.items():
        rule = rules.get(key)
        if rule is None:
            broken.append(Broken((key,), ("unknown",)))
        elif not has_type(rule.kind, value):
            broken.append(Broken((key,), (type_words(rule, value),)))
        elif value is not None and not rule.allowed(value):
            broken.append(Broken((key,), rule.words))
    return broken


def broken_in_trainer(raw: dict, broken: list[Broken]) -> list[Broken]:
    """The rule across trainer keys, checked with them: before the sections after `trainer`."""
    keys = ("trainer.lr_schedule", "trainer.lr_decay_every")
    if any(k in b.keys for b in broken for k in keys):
        return []
    if raw["trainer"]["lr_schedule"] == "step" and raw["trainer"]["lr_decay_every"] is None:
        return [Broken(keys[1:], ("trainer.lr_schedule=step",))]
    return []


def broken_across(base: str, raw: dict) -> list[Broken]:
    """Rules over several keys, for a config whose every key is valid on its own."""
    algo, data, ev = raw["algo"], raw["data"], raw["eval"]
    broken = []
    if base == "maml_sinusoid":
        if algo["checkpoint"]:  # an MLP runs its tasks under vmap with task_batching=auto
            broken.append(Broken(("algo.checkpoint",), ("task_batching=loop",)))
        return broken
    # MAML's head has train_ways outputs and is tested on data.ways-way tasks
    if base == "maml_omniglot" and algo["train_ways"] not in (None, data["ways"]):
        broken.append(Broken(("algo.train_ways",), ("equal to data.ways",)))
    # what each split must hold (DataError): ways <= its classes, shots + query <= 20
    ways_key = "algo.train_ways" if algo["train_ways"] else "data.ways"
    train_ways = algo["train_ways"] or data["ways"]
    train_query_key = "algo.train_query" if algo["train_query"] else "data.query"
    train_query = algo["train_query"] or data["query"]
    test_query_key = "eval.query" if ev["query"] else "data.query"
    test_query = ev["query"] or data["query"]
    fits = [(ways_key, train_ways, OMNIGLOT_CLASSES["train"])]
    fits += [("data.ways", data["ways"], min(OMNIGLOT_CLASSES["val"], OMNIGLOT_CLASSES["test"]))]
    for keys, ways, classes in fits:
        if ways > classes:
            broken.append(Broken((keys,), (f"at most {classes}",), (DataError,)))
    shapes = [(("data.shots", train_query_key), data["shots"] + train_query)]
    shapes += [(("data.shots", test_query_key), data["shots"] + test_query)]
    shapes += [(("eval.shots", test_query_key), s + test_query) for s in ev["shots"]]
    for keys, examples in shapes:
        if examples > OMNIGLOT_EXAMPLES:
            broken.append(Broken(keys, (f"at most {OMNIGLOT_EXAMPLES}",), (DataError,)))
    return broken


# --- drawing and checking ---------------------------------------------------------------------


@st.composite
def override_sets(draw, base: str) -> dict[str, Any]:
    """One to three keys of the base's spec (half the time from those that interact), each an
    edge value, a wider draw of the right type or (one in four) of a wrong type; now and then an
    unknown key."""
    rules = SPECS[base][1]
    pool = TOGETHER[base] if draw(st.booleans()) else sorted(rules)
    size = draw(st.sampled_from([1, 1, 2, 3]))
    keys = draw(st.lists(st.sampled_from(pool), min_size=size, max_size=size, unique=True))
    overrides = {}
    for key in keys:
        rule = rules[key]
        values = [st.sampled_from(rule.edges), rule.wider, st.sampled_from(rule.edges)]
        values.append(st.sampled_from(wrong_types(rule.kind)))
        overrides[key] = draw(st.one_of(values))
    if draw(st.integers(0, 9)) == 0:
        overrides[draw(st.sampled_from(UNKNOWN))] = draw(st.sampled_from([1, "x", None]))
    return overrides


@functools.cache
def base_config(base: str) -> dict:
    overrides = SPECS[base][0]
    if "data=omniglot" in overrides:
        root = real_data_root()
        if root is None:
            pytest.skip("real Omniglot not found: set METALEARN_DATA to the folder holding it")
        overrides = [*overrides, f"data.root={root}"]
    return compose_config(overrides)


def with_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *sections, last = key.split(".")
        node = raw
        for section in sections:
            node = node[section]
        node[last] = copy.deepcopy(value)
    return raw


def check(base: str, raw: dict, overrides: dict[str, Any]) -> None:
    """Build `raw` (the base config with `overrides` applied) and compare with the spec."""
    broken = broken_keys(SPECS[base][1], overrides)
    broken += broken_in_trainer(raw, broken) + ([] if broken else broken_across(base, raw))
    if not broken:
        build_run(raw)
        TALLY["valid_config"] += 1
        return
    with pytest.raises((ConfigError, DataError)) as error:
        build_run(raw)
    assert any(b.explains(error.value) for b in broken), (
        f"{overrides}: {type(error.value).__name__}: {error.value}\nexpected one of {broken}"
    )
    TALLY["invalid_config"] += 1


@functools.cache
def _omniglot(root, split, image_size, split_seed, download, device):
    cfg = OmniglotConfig(
        root=root, split=split, image_size=image_size, split_seed=split_seed, download=download
    )
    return omniglot_tasks(cfg, device)


def omniglot_once(cfg: OmniglotConfig, device):
    """omniglot_tasks, loaded once per setting: the fuzzer tests the checks, not the loader."""
    return _omniglot(cfg.root, cfg.split, cfg.image_size, cfg.split_seed, cfg.download, device)


@pytest.fixture(scope="module", autouse=True)
def load_omniglot_once():
    with mock.patch.dict(build.DATASETS, {"omniglot": (OmniglotConfig, omniglot_once)}):
        yield


FUZZ = settings(
    derandomize=True,  # the same examples on every run and machine
    database=None,  # writes no .hypothesis folder
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # quiet_wandb only sets env vars
)


@settings(FUZZ, max_examples=500)
@given(overrides=override_sets("maml_sinusoid"))
def test_maml_sinusoid_overrides(overrides: dict[str, Any]):
    check("maml_sinusoid", with_overrides(base_config("maml_sinusoid"), overrides), overrides)


@settings(FUZZ, max_examples=300)
@given(overrides=override_sets("protonet_omniglot"))
def test_protonet_omniglot_overrides(overrides: dict[str, Any]):
    base = "protonet_omniglot"
    check(base, with_overrides(base_config(base), overrides), overrides)


@settings(FUZZ, max_examples=300)
@given(overrides=override_sets("maml_omniglot"))
def test_maml_omniglot_overrides(overrides: dict[str, Any]):
    check("maml_omniglot", with_overrides(base_config("maml_omniglot"), overrides), overrides)


@pytest.mark.parametrize("base", sorted(SPECS))
def test_every_key_alone_at_its_edges(base: str):
    """Each key alone at each of its edge values and wrong types, and each unknown key: the draws
    above find combinations; this leaves no single bound to chance."""
    rules = SPECS[base][1]
    singles = [{k: v} for k, rule in rules.items() for v in (*rule.edges, *wrong_types(rule.kind))]
    for overrides in [*singles, *({k: 1} for k in UNKNOWN)]:
        check(base, with_overrides(base_config(base), overrides), overrides)


def command_line(value: Any) -> str:
    """`value` as typed after `key=` in Hydra's override grammar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, float) and not math.isfinite(value):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}[str(value)]
    if isinstance(value, list):
        return f"[{','.join(map(command_line, value))}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{command_line(v)}" for k, v in value.items()) + "}"
    return repr(value)


def has_key(raw: dict, key: str) -> bool:
    *sections, last = key.split(".")
    for section in sections:
        raw = raw.get(section, {})
    return last in raw


@settings(FUZZ, max_examples=50)
@given(overrides=override_sets("maml_sinusoid"))
def test_overrides_typed_on_the_command_line(overrides: dict[str, Any]):
    """The same oracle on overrides that go through Hydra's parser, as `metalearn train` reads
    them; the composed config must hold each value as drawn."""
    base = base_config("maml_sinusoid")
    typed = [
        f"{'' if has_key(base, key) else '+'}{key}={command_line(value)}"
        for key, value in overrides.items()
    ]
    raw = compose_config([*SPECS["maml_sinusoid"][0], *typed])
    expected = with_overrides(base, overrides)
    assert json.dumps(raw, sort_keys=True) == json.dumps(expected, sort_keys=True), typed
    check("maml_sinusoid", raw, overrides)
