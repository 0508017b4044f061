"""The conversion tool never silently overwrites and never trusts a corrupt checkpoint: a
non-empty --out-dir needs --overwrite, which replaces it as a whole (no stale shard or index
survives a re-export at another PP), and checksums are verified on read."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_convert_tool

pytestmark = pytest.mark.slow


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def test_a_non_empty_out_dir_is_refused_without_overwrite(tiny_models, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "trainer_state.json").write_text('{"step": 40}')
    proc = run_convert_tool("hf-to-mcore", "--hf-dir", str(tiny_models["llama"]),
                            "--out-dir", str(out))  # fmt: skip
    line = _one_error_line(proc)
    assert f"--out-dir {out}: not empty (1 entries: trainer_state.json); pass --overwrite" in line
    assert (out / "trainer_state.json").read_text() == '{"step": 40}'


@pytest.fixture(scope="module")
def overwritten(tiny_models, tmp_path_factory):
    """hf-to-mcore --overwrite onto a directory holding an older checkpoint's files."""
    out = tmp_path_factory.mktemp("conv") / "m"
    (out / "model").mkdir(parents=True)
    (out / "model" / "__1_0.distcp").write_bytes(b"stale shard of a tp=2 save")
    (out / "trainer_state.json").write_text('{"step": 40}')
    proc = run_convert_tool("hf-to-mcore", "--hf-dir", str(tiny_models["llama"]),
                            "--out-dir", str(out), "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_overwrite_replaces_the_directory_as_a_whole(overwritten):
    from megatron_mel.convert.manifest import verify

    assert not (overwritten / "model" / "__1_0.distcp").exists()
    assert not (overwritten / "trainer_state.json").exists()
    assert verify(overwritten) is True  # every file it has is its own, checksummed
    assert [p.name for p in overwritten.parent.iterdir()] == ["m"]  # no staging left behind


def test_re_export_at_another_pp_leaves_no_stale_shards(overwritten, tmp_path):
    """An HF directory exported at PP=2 (two shards and an index) re-exported at PP=1."""
    from transformers import AutoModelForCausalLM

    from megatron_mel.convert.hf_io import HFCheckpointReader

    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (hf / name).write_bytes(b"old shard")
    (hf / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    proc = run_convert_tool("mcore-to-hf", "--mcore-dir", str(overwritten), "--out-dir", str(hf),
                            "--overwrite")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = sorted(p.name for p in hf.iterdir() if "safetensors" in p.name)
    assert weights == ["model.safetensors"]  # the PP=2 shards and index are gone
    ours = set(HFCheckpointReader(hf).names())
    theirs = set(AutoModelForCausalLM.from_pretrained(hf).state_dict())
    assert ours <= theirs  # (transformers adds the tied lm_head)


def test_mcore_to_hf_notices_a_corrupt_checkpoint(overwritten, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(overwritten, corrupt)
    shard = next((corrupt / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x04
    shard.write_bytes(bytes(data))
    proc = run_convert_tool("mcore-to-hf", "--mcore-dir", str(corrupt), "--out-dir",
                            str(tmp_path / "hf"), "--verify")  # fmt: skip
    line = _one_error_line(proc)
    assert line == f"error: {shard}: checksum mismatch (sha256 differs from manifest.json)"
    assert not (tmp_path / "hf").exists()
    assert json.loads((corrupt / "manifest.json").read_text())["algorithm"] == "sha256"
