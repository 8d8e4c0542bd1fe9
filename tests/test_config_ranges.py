"""Every numeric config key declares its allowed range, and a value outside it is one line, before any data is read."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from dtg.cli import main
from dtg.config import Config, ConfigError, load_config

NUMERIC = (int, float)


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, __import__("types").UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def numeric_fields(cls=Config, prefix=""):
    """(dotted key, annotation as declared, is_list) of every numeric field (lists of numbers included)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        tp = _strip_optional(tp)
        is_list = typing.get_origin(tp) is list
        item = typing.get_args(tp)[0] if is_list else tp
        base = typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item
        if base in NUMERIC:
            yield f"{prefix}{f.name}", item, is_list


FIELDS = list(numeric_fields())


def test_every_numeric_key_declares_a_range():
    assert len(FIELDS) > 80
    missing = [key for key, item, _ in FIELDS if typing.get_origin(item) is not typing.Annotated]
    assert missing == []


def _outside(meta) -> list:
    """Values just outside an annotated-types bound."""
    out = []
    if getattr(meta, "gt", None) is not None:
        out.append(meta.gt)
    if getattr(meta, "ge", None) is not None:
        out.append(meta.ge - 1 if isinstance(meta.ge, int) else meta.ge - 0.5)
    if getattr(meta, "lt", None) is not None:
        out.append(meta.lt)
    if getattr(meta, "le", None) is not None:
        out.append(meta.le + 1 if isinstance(meta.le, int) else meta.le + 0.5)
    return out


CASES = [(key, bad, is_list) for key, item, is_list in FIELDS
         for m in typing.get_args(item)[1:] for bad in _outside(m)]


@pytest.mark.parametrize("key, bad, is_list", CASES, ids=[f"{k}={b}" for k, b, _ in CASES])
def test_out_of_range_value_is_refused_naming_the_key(key, bad, is_list):
    base = int if isinstance(bad, int) and not isinstance(bad, bool) else float
    text = f"[{bad}, {bad}]" if is_list else str(base(bad))
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={text}"])
    msg = str(e.value)
    assert f"'{key}" in msg and "out of range (allowed:" in msg and "\n" not in msg


@pytest.mark.parametrize("key, item, is_list", FIELDS, ids=[k for k, _, _ in FIELDS])
def test_defaults_lie_in_their_ranges(key, item, is_list):
    node = Config()
    for part in key.split("."):
        node = getattr(node, part)
    for v in (node if is_list else [node]):
        if v is None:
            continue
        for m in typing.get_args(item)[1:]:
            assert getattr(m, "gt", None) is None or v > m.gt
            assert getattr(m, "ge", None) is None or v >= m.ge
            assert getattr(m, "lt", None) is None or v < m.lt
            assert getattr(m, "le", None) is None or v <= m.le


def test_shipped_configs_are_in_range():
    for path in sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, needle", [
    ("solver.steps=[900, 700]", "'solver.steps': [900, 700] must be increasing and below solver.max_iter (1000)"),
    ("solver.steps=[700, 1000]", "below solver.max_iter"),
    ("data.weak_view.short_edge=[160, 128]", "'data.weak_view.short_edge': [160, 128] must be a [min, max] pair"),
    ("synth.object_size=[20]", "'synth.object_size'"),
])
def test_relations_between_keys(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


@pytest.mark.parametrize("override", ["solver.lr=-1", "data.batch_labeled=0", "semi.ema_momentum=2",
                                      "dtg.rcnn.tau=1.5", "solver.steps=[900,700]"])
def test_cli_refuses_before_reading_data(override, tmp_path, capsys):
    code = main(["train", "--set", f"data.train_json={tmp_path / 'missing.json'}", "--set", override,
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert override.split("=")[0] in err and "missing.json" not in err
    assert not (tmp_path / "out").exists()
