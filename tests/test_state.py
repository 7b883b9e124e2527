"""The ``checkpoint`` state file: TensorFlow's text format, path resolution, hostile content."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import tf_or_skip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpuckpt
from gpuckpt.format import state as state_module
from gpuckpt.format.state import read_state


def _quote(path: str) -> str:
    return '"' + "".join(f"\\{b:03o}" if b >= 0x80 or b in (0x22, 0x5C) else chr(b) for b in path.encode()) + '"'


def test_read_state_resolves_relative_and_keeps_absolute(tmp_path):
    cafe = "caf\u00e9/ckpt-3"
    (tmp_path / "checkpoint").write_text(
        "# a comment\n"
        f"model_checkpoint_path: {_quote(cafe)}\n"
        "all_model_checkpoint_paths: 'ckpt-2'\n"
        f"all_model_checkpoint_paths: {_quote('/abs/ckpt-3')}\n"
        "all_model_checkpoint_timestamps: 1.5\n"
        "last_preserved_timestamp: 2\n"
    )
    state = read_state(tmp_path)
    assert state.model_checkpoint_path == os.path.join(str(tmp_path), "caf\u00e9/ckpt-3")
    assert state.all_model_checkpoint_paths == (os.path.join(str(tmp_path), "ckpt-2"), "/abs/ckpt-3")
    assert state.all_model_checkpoint_timestamps == (1.5,)
    assert state.last_preserved_timestamp == 2.0


def test_state_file_that_is_huge_is_refused(tmp_path):
    with open(tmp_path / "checkpoint", "wb") as f:
        f.truncate((64 << 20) + 10)
    with pytest.raises(gpuckpt.FormatError, match="larger"):
        read_state(tmp_path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_state_file_content_gives_a_state_or_format_error(tmp_path, content):
    (tmp_path / "checkpoint").write_bytes(content)
    try:
        state = read_state(tmp_path)
    except gpuckpt.FormatError:
        return
    assert state is not None and state.model_checkpoint_path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"), min_size=1, max_size=12
    ),
    absolute=st.booleans(),
)
def test_state_paths_resolve_like_tensorflow(tmp_path, name, absolute):
    tf = tf_or_skip()
    path = os.path.join(str(tmp_path), name) if absolute else name
    (tmp_path / "checkpoint").write_text(f"model_checkpoint_path: {_quote(path)}\n")
    theirs = tf.train.get_checkpoint_state(str(tmp_path))
    ours = read_state(tmp_path)
    assert ours.model_checkpoint_path == theirs.model_checkpoint_path


def test_open_follows_the_state_file_when_the_named_checkpoint_is_deleted(tmp_path, monkeypatch):
    """A CheckpointManager-like writer names ckpt-2, then deletes ckpt-1: an open that read the
    state file just before reads it again instead of failing."""
    gpuckpt.save(str(tmp_path / "ckpt-1"), {"w": np.ones(2)}, update_state=True)
    real = state_module.latest_checkpoint
    calls = []

    def racing(directory, *args):
        found = real(directory, *args)
        if not calls:  # the writer moves on right after the first look
            gpuckpt.save(str(tmp_path / "ckpt-2"), {"w": np.full(2, 2.0)}, max_to_keep=1)
        calls.append(found)
        return found

    monkeypatch.setattr(state_module, "latest_checkpoint", racing)
    with gpuckpt.open(tmp_path) as ckpt:
        assert ckpt.get_tensor("w").tolist() == [2.0, 2.0]
    assert calls[0].endswith("ckpt-1") and calls[-1].endswith("ckpt-2")


def test_nothing_found_is_a_checkpoint_error_and_file_not_found(tmp_path):
    with pytest.raises(gpuckpt.CheckpointNotFoundError) as info:
        gpuckpt.open(tmp_path / "nothing")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, gpuckpt.CheckpointError)
    assert "nothing.index" in str(info.value)
