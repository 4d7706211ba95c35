"""One sniffer decides what a tensor file is, from its structure, not its first byte."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.engine.replay import replay
from energydiag.io.formats import Format, classify, sniff
from energydiag.io.rundir import Run
from energydiag.io.tensorfile import read_all


def header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def resave_with_header_length_128_mod_256(path: Path) -> int:
    """Rewrite a safetensors file, padding its metadata until the header length's low byte is
    0x80: the file's first byte is then the legacy pickle protocol marker."""
    tensors, meta = read_all(path)
    for pad in range(512):
        save_file(tensors, str(path), metadata={**meta, "padding": "x" * pad})
        if header_length(path) % 256 == 128:
            assert path.read_bytes()[0] == 0x80
            return header_length(path)
    raise AssertionError("no padding gave a header length of 128 mod 256")


def test_a_safetensors_file_starting_with_0x80_is_safetensors(small_run):
    batch = small_run / "batches" / "step-00000004.safetensors"
    resave_with_header_length_128_mod_256(batch)
    assert sniff(batch) is Format.SAFETENSORS
    assert Run(small_run).batch(4).step == 4
    result = replay(Run(small_run), 4, 7)
    assert result.fault is None and len(result.steps) == 4


def test_a_640_byte_header_is_read_as_safetensors_by_inspect(tmp_path):
    path = tmp_path / "weights.bin"
    tensors = {"layer.weight": torch.ones(3, 3)}
    for pad in range(1024):
        save_file(tensors, str(path), metadata={"note": "y" * pad})
        if header_length(path) == 640:
            break
    assert header_length(path) == 640 and path.read_bytes()[0] == 0x80
    assert sniff(path) is Format.SAFETENSORS
    out = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert out.exit_code == 0, out.output
    assert '"layer.weight"' in out.output
    assert load_file(str(path))["layer.weight"].sum() == 9


@pytest.mark.parametrize(
    ("head", "size", "expected"),
    [
        (struct.pack("<Q", 128) + b"{", 200, Format.SAFETENSORS),
        (struct.pack("<Q", 128) + b"{", 100, Format.UNKNOWN),  # header beyond the file's end
        (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9", 5000, Format.TORCH_PICKLE),
        (b"\x80\x09rest-of", 5000, Format.UNKNOWN),  # no such pickle protocol
        (b"PK\x03\x04abcde", 5000, Format.TORCH_ZIP),
        (b"", 0, Format.UNKNOWN),
    ],
)
def test_classify(head, size, expected):
    assert classify(head, size) is expected


def test_sniff_folders_and_missing_paths(tmp_path):
    assert sniff(tmp_path / "nope") is Format.MISSING
    assert sniff(tmp_path) is Format.UNKNOWN
    (tmp_path / ".metadata").write_bytes(b"")
    assert sniff(tmp_path) is Format.DCP


def test_a_torch_save_file_is_still_a_torch_file(tmp_path):
    new, legacy = tmp_path / "new.pt", tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, new)
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert sniff(new) is Format.TORCH_ZIP and sniff(legacy) is Format.TORCH_PICKLE


def test_a_fault_round_trips_through_strict_json_with_its_op_intact(fixtures_dir):
    import json

    from energydiag.engine.localise import Fault
    from energydiag.engine.observers import OpEvent
    from energydiag.report.jsonout import jsonable

    fault = replay(Run(fixtures_dir / "nan"), 50).fault
    assert isinstance(fault.op, OpEvent)
    text = json.dumps(jsonable(fault.to_dict()), allow_nan=False)
    back = Fault.from_dict(json.loads(text))
    assert isinstance(back.op, OpEvent) and back.op.op == fault.op.op == "aten::_softmax"
    assert back.op.inputs[0].shape == fault.op.inputs[0].shape
    assert back.to_dict() == fault.to_dict() or json.dumps(jsonable(back.to_dict())) == text


def test_inspect_sniffs_a_checkpoint_once_and_opens_it_at_most_twice(fixtures_dir, monkeypatch):
    """Once for its tensors' statistics (its step comes with them), once for the model that
    runs on the batch."""
    from energydiag.analyses.inspection import inspect
    from energydiag.io import formats, tensorfile

    formats._sniff.cache_clear()
    ckpt = fixtures_dir / "healthy" / "checkpoints" / "step-00000100.safetensors"
    sniffed, opened = [], []
    real_open, real_tensors = open, tensorfile.open_tensors

    def sniff_open(path, *args, **kwargs):
        sniffed.append(Path(path))
        return real_open(path, *args, **kwargs)

    def open_tensors(path):
        opened.append(Path(path))
        return real_tensors(path)

    monkeypatch.setattr(formats, "open", sniff_open, raising=False)
    monkeypatch.setattr(tensorfile, "open_tensors", open_tensors)
    report = inspect(ckpt)
    assert report.batch is not None and report.checkpoint.step == 100
    assert sniffed.count(ckpt) == 1
    assert opened.count(ckpt) == 2
