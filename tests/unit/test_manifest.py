"""Checkpoint manifests: every file's size and sha256, and the bad file named on a mismatch."""

from __future__ import annotations

import json
import logging

import pytest

from megatron_mel.convert import manifest
from megatron_mel.convert.manifest import CorruptCheckpoint


@pytest.fixture
def checkpoint(tmp_path):
    root = tmp_path / "step_000002"
    (root / "model").mkdir(parents=True)
    (root / "model" / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (root / "trainer_state.json").write_text(json.dumps({"step": 2}))
    (root / "rng").mkdir()
    (root / "rng" / "rank_0.pt").write_bytes(b"\x80\x04rng")
    names = manifest.list_files(root)
    manifest.write_manifest(root, manifest.hash_files(root, names))
    return root


def test_manifest_lists_every_file_and_verifies(checkpoint):
    table = manifest.read_manifest(checkpoint)
    assert sorted(table) == ["model/__0_0.distcp", "rng/rank_0.pt", "trainer_state.json"]
    assert table["model/__0_0.distcp"]["size"] == 256 * 64
    assert manifest.verify(checkpoint) is True


def test_a_flipped_byte_is_named(checkpoint):
    shard = checkpoint / "model" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[1000] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=rf"^{shard}: checksum mismatch"):
        manifest.verify(checkpoint)


def test_a_truncated_file_is_named_with_its_sizes(checkpoint):
    state = checkpoint / "trainer_state.json"
    state.write_text("{")
    with pytest.raises(CorruptCheckpoint, match=rf"{state}: 1 bytes, manifest.json says 11"):
        manifest.verify(checkpoint)


def test_a_missing_file_and_an_unreadable_manifest(checkpoint):
    (checkpoint / "rng" / "rank_0.pt").unlink()
    with pytest.raises(CorruptCheckpoint, match=r"rank_0.pt: missing"):
        manifest.verify(checkpoint)
    (checkpoint / manifest.MANIFEST_NAME).write_text('{"format": 1, "fil')
    with pytest.raises(CorruptCheckpoint, match=r"manifest.json: unreadable checkpoint manifest"):
        manifest.verify(checkpoint)


def test_a_checkpoint_from_before_manifests_loads_with_a_warning(checkpoint, caplog):
    (checkpoint / manifest.MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING):
        assert manifest.verify(checkpoint) is False
    assert "no manifest.json (written before checksums): not verified" in caplog.text
