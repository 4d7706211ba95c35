"""Broken inputs, as a new user's files would be: every case ends in exit 0, 1 or 2; an exit-2
message is one line naming the file or option; the run directory is unchanged; no pickle ever
runs; no case takes a minute.

Mutators are hand-written per format and seeded, so a failure names its case. CI runs about
1,100 cases; ENERGYDIAG_FUZZ_SCALE=5 runs five times as many locally (marked slow).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.reference.synthetic import Task, record_run

SCALE = int(os.environ.get("ENERGYDIAG_FUZZ_SCALE", "1"))
SENTINEL = Path("/tmp/energydiag-fuzz-sentinel")
runner = CliRunner()


class Pwned:
    """Unpickling this would create the sentinel file: it must never happen."""

    def __reduce__(self):
        return (Path.touch, (SENTINEL,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz") / "run"
    record_run(
        root,
        task=Task(batch=4, seq=3, d_context=4, horizon=2, d_action=2),
        model_kwargs={"d_model": 8, "n_heads": 1},
        steps=4,
        checkpoint_every=2,
    )
    return root


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def run_cli(args: list[str], names: list[str]) -> None:
    """The contract every case is held to."""
    SENTINEL.unlink(missing_ok=True)
    start = time.perf_counter()
    result = runner.invoke(app, [str(a) for a in args])
    elapsed = time.perf_counter() - start
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output[-800:])
    assert elapsed < 60, (args, elapsed)
    assert not SENTINEL.exists(), args
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert any(n in lines[0] for n in names), (args, lines[0])


# --- mutators: (rng, original bytes or text) -> new content --------------------------------------


def safetensors_header_mutation(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    choice = rng.randrange(12)
    if choice == 0:
        header[name] = rng.choice([None, 1, "x", [1, 2]])
    elif choice == 1:
        entry["data_offsets"] = rng.choice([None, [], [5], [10, 2], ["a", "b"], [0, 2**62]])
    elif choice == 2:
        entry["shape"] = rng.choice([[2**40], [2**27], [-1], "x", None, [[1]]])
    elif choice == 3:
        entry["dtype"] = rng.choice(["F8", "Q4", None, 7, "I128"])
    elif choice == 4:
        other = rng.choice(list(header))
        if other != "__metadata__":
            entry["data_offsets"] = header[other]["data_offsets"]  # overlapping
    elif choice == 5:
        header["__metadata__"] = rng.choice([None, [], {"step": 5}, "x"])
    elif choice == 6:
        return data[: rng.randrange(len(data))]  # truncated anywhere
    elif choice == 7:
        flipped = bytearray(data)
        for _ in range(rng.randrange(1, 20)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        return bytes(flipped)
    elif choice == 8:
        deep = "[" * 100_000 + "]" * 100_000
        return struct.pack("<Q", len(deep)) + deep.encode() + body
    elif choice == 9:
        return struct.pack("<Q", rng.choice([0, 2**62, n + 5])) + data[8:]
    elif choice == 10:
        header = rng.choice([[], "x", 1, None])
    else:
        entry["data_offsets"] = [0, 0]
        entry["shape"] = [rng.choice([0, 2**20, 2**40])]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def pt_mutation(rng: random.Random, path: Path) -> None:
    choice = rng.randrange(9)
    if choice == 0:
        path.write_bytes(b"")
    elif choice == 1:
        path.write_text("not a checkpoint\n" * rng.randrange(1, 5))
    elif choice == 2:
        path.write_bytes(b"\x80" + rng.randbytes(rng.randrange(1, 400)))
    elif choice == 3:
        path.write_bytes(b"PK\x03\x04" + rng.randbytes(rng.randrange(1, 400)))
    elif choice == 4:
        loop: dict = {"w": torch.ones(2)}
        loop["state_dict"] = loop
        torch.save(loop, path)
    elif choice == 5:
        torch.save({"w": torch.empty(3, device="meta")}, path)
    elif choice == 6:
        torch.save({"w": torch.ones(3).to_sparse()}, path)
    elif choice == 7:
        torch.save({"w": torch.ones(1).expand(10**10)}, path)
    else:
        torch.save({"w": torch.ones(2), "evil": Pwned()}, path)


MANIFEST_EDITS: list[Callable[[dict, random.Random], None]] = [
    lambda m, r: m.__setitem__("notes", r.choice([None, [], 3])),
    lambda m, r: m["loss"].__setitem__("name", r.choice([["x"], 3, None])),
    lambda m, r: m["loss"].__setitem__("target", r.choice([3, ":", "..evil:make", "../../x:y"])),
    lambda m, r: m["model"].__setitem__("target", r.choice([":", "x", "..a:b", "a:", "os:system"])),
    lambda m, r: m["model"].__setitem__("kwargs", r.choice([None, [], {"d_model": -3}, {"zz": 1}])),
    lambda m, r: m["optimizer"].__setitem__("kwargs", r.choice([{"lr": -1}, {"betas": 3}, []])),
    lambda m, r: m["optimizer"].__setitem__("start_step", r.choice([True, -1, "1", 10**40])),
    lambda m, r: m.__setitem__("grad_clip", r.choice([0, -1, "x", float("nan")])),
    lambda m, r: m.__setitem__("autocast_dtype", r.choice(["float8", 1, []])),
    lambda m, r: m.__setitem__("format", r.choice(["energydiag/9", None, 1])),
    lambda m, r: m.__setitem__("seed", r.choice(["x", 1.5, True])),
    lambda m, r: m.__setitem__("step", r.choice([1, "nope", "x:y"])),
    lambda m, r: m.__setitem__("scaler", r.choice([[], {"init_scale": "x"}, {"bogus": 1}])),
    lambda m, r: m.__setitem__("environment", r.choice([None, 7])),
    lambda m, r: m.__setitem__(r.choice(["extra", "Model"]), 1),
    lambda m, r: m.update(
        format="energydiag/2",
        distributed=r.choice(
            [
                None,
                {
                    "world_size": r.choice([0, -2, "2", 2.5, 10**9]),
                    "backend": "gloo",
                    "parallelism": "ddp",
                },
                {"world_size": 2, "backend": "gloo", "parallelism": "fsdp"},
                {"world_size": 2, "backend": "gloo", "parallelism": "ddp"},  # no rank files
                [],
            ]
        ),
    ),
]


def manifest_text(rng: random.Random, text: str) -> str:
    choice = rng.randrange(4)
    if choice == 0:
        return "9" * 5000  # an integer beyond Python's 4,300-digit limit
    if choice == 1:
        return "[" * 50_000 + "]" * 50_000
    if choice == 2:
        return text[: rng.randrange(len(text))]
    manifest = json.loads(text)
    rng.choice(MANIFEST_EDITS)(manifest, rng)
    return json.dumps(manifest)


def metrics_text(rng: random.Random) -> bytes:
    choice = rng.randrange(9)
    points = [(s, 2.0 - s * 0.01) for s in range(rng.randrange(0, 40))]
    if choice == 0:
        return b"\xff\xfe" + rng.randbytes(40)
    if choice == 1:
        points = [(rng.choice(["inf", "NaN", "1e3", 2**63, -5, "²", 1.5]), 1.0)] + points
    elif choice == 2:
        points = [(s, rng.choice([1e308, -1e308, 0.0])) for s, _ in points]
    elif choice == 3:
        points = points[: rng.randrange(0, 5)]
    elif choice == 4:
        return b'{"step": 1, "loss": 2}\n{not json}\n'
    elif choice == 5:
        return rng.choice(
            [b"[" * 10_000 + b"]" * 10_000, b'[{"_step": 1, "loss": 2}, 3]', b"[1, 2"]
        )
    lines = [json.dumps({"step": s, "loss": v}) for s, v in points]
    if choice == 6:
        lines.insert(rng.randrange(len(lines) + 1), '"just a string"')
    if choice == 7:
        return ("step,loss\n" + "".join(f"{s},{v}\n" for s, v in points)).encode()
    return ("\n".join(lines) + "\n").encode()


# --- the cases ----------------------------------------------------------------------------------

FILE_CASES = range(0, 450 * SCALE)
RUN_CASES = range(0, 200 * SCALE)
LOG_CASES = range(0, 450 * SCALE)
RUN_COMMANDS = [
    ["replay", "{run}", "--from-step", "0"],
    ["bisect", "{run}"],
    ["check", "{run}"],
    ["diagnose", "{run}"],
    ["timeline", "{run}"],
    ["inspect", "{run}/checkpoints/step-00000002.safetensors"],
]


@pytest.mark.parametrize("seed", FILE_CASES)
def test_broken_checkpoint_files(tiny, tmp_path, seed):
    rng = random.Random(seed)
    source = tiny / "checkpoints" / "step-00000002.safetensors"
    if seed % 3 == 2:
        target = tmp_path / "broken.pt"
        pt_mutation(rng, target)
    else:
        target = tmp_path / "broken.safetensors"
        target.write_bytes(safetensors_header_mutation(rng, source.read_bytes()))
    command = rng.choice([["inspect", target], ["inspect", target, "--json"]])
    run_cli(command, [target.name])


@pytest.mark.parametrize("seed", RUN_CASES)
def test_broken_run_directories(tiny, tmp_path, seed):
    rng = random.Random(1_000_000 + seed)
    run = tmp_path / "run"
    shutil.copytree(tiny, run)
    kind = rng.randrange(5)
    if kind == 0:
        path = run / "run.json"
        path.write_text(manifest_text(rng, path.read_text()))
    elif kind == 1:
        path = rng.choice(sorted((run / "checkpoints").iterdir()))
        path.write_bytes(safetensors_header_mutation(rng, path.read_bytes()))
    elif kind == 2:
        path = rng.choice(sorted((run / "batches").iterdir()))
        path.write_bytes(safetensors_header_mutation(rng, path.read_bytes()))
    elif kind == 3:
        path = run / "metrics.jsonl"
        path.write_bytes(metrics_text(rng))
    else:
        path = run / rng.choice(["failure.json", "run.json"])
        path.unlink(missing_ok=True)
        if rng.random() < 0.5:
            path.symlink_to(path)  # a loop
        else:
            path.symlink_to("/etc/hostname")  # outside the run
    before = tree_hash(run)
    command = [a.format(run=run) for a in rng.choice(RUN_COMMANDS)]
    run_cli(command, [path.name, run.name, "run.json", "checkpoints", "batches"])
    assert tree_hash(run) == before, command


@pytest.mark.parametrize("seed", LOG_CASES)
def test_broken_metric_logs(tmp_path, seed):
    rng = random.Random(2_000_000 + seed)
    content = metrics_text(rng)
    suffix = rng.choice([".jsonl", ".csv", ".jsonl"])
    if rng.random() < 0.1:
        path = tmp_path / "events.out.tfevents.1.host"
        path.write_bytes(rng.randbytes(rng.randrange(0, 300)))
    else:
        path = tmp_path / f"log{suffix}"
        path.write_bytes(content)
    options = rng.choice(
        [
            [],
            ["--window", "-3"],
            ["--batch-size", "0", "--tau", "0.5"],
            ["--tau", "0"],
            ["--metric", "nope"],
        ]
    )
    run_cli(
        ["curves", path, *options], [path.name, "--window", "--batch-size", "--tau", "--metric"]
    )


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "{run}", "--device", "tpu"],
        ["replay", "{run}", "--device", ""],
        ["replay", "{run}", "--every", "-1"],
        ["replay", "{run}", "--to-step", "99999999"],
        ["replay", "{run}", "--metrics-out", "/nonexistent/dir/t.csv"],
        ["replay", "{run}", "--metrics-out", "{run}"],
        ["whatif", "{run}", "--steps", "100000000", "--try", "tau=1"],
        ["whatif", "{run}", "--try", "tau=abc"],
        ["check", "{run}", "--json-out", "/dev/full/x.json"],
        ["timeline", "{run}", "--png", "/nonexistent/t.png"],
        [
            "convert",
            "{run}",
            "--checkpoints",
            "/abs/{{step}}.pt",
            "--out",
            "{run}/x",
            "--model",
            "a:b",
        ],
        [
            "convert",
            "{run}",
            "--checkpoints",
            "*{{step}}*{{step}}",
            "--out",
            "{run}/x",
            "--model",
            "a:b",
        ],
        [
            "convert",
            "{run}",
            "--checkpoints",
            "checkpoints/step-{{step}}.safetensors",
            "--out",
            "{run}/run.json",
            "--model",
            "a:b",
        ],
    ],
)
def test_bad_options_are_one_line(tiny, tmp_path, args):
    run = tmp_path / "run"
    shutil.copytree(tiny, run)
    before = tree_hash(run)
    command = [a.format(run=run) for a in args]
    run_cli(command, [*command[1:], "run.json"])  # the option, or the file given to it
    assert tree_hash(run) == before


# --- W&B run files and torch.distributed.checkpoint folders --------------------------------------

WANDB_CASES = range(0, 60 * SCALE)
DCP_CASES = range(0, 80 * SCALE)


@pytest.fixture(scope="module")
def wandb_file(tmp_path_factory) -> Path:
    pytest.importorskip("wandb")
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("wandb")
    script = (
        "import sys, wandb; run = wandb.init(project='p', dir=sys.argv[1]); "
        "[run.log({'loss': 2.0 - s / 100}) for s in range(200)]; run.finish()"
    )
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", script, str(folder)], env=env, check=True)
    (path,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    return path


@pytest.mark.parametrize("seed", WANDB_CASES)
def test_broken_wandb_files(wandb_file, tmp_path, seed):
    rng = random.Random(3_000_000 + seed)
    data = bytearray(wandb_file.read_bytes())
    choice = rng.randrange(4)
    if choice == 0:
        data = data[: rng.randrange(len(data))]
    elif choice == 1:
        for _ in range(rng.randrange(1, 20)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif choice == 2:
        data = bytearray(b":W&B\xe1\xbe\x00" + rng.randbytes(rng.randrange(0, 40_000)))
    else:
        data = bytearray(rng.randbytes(rng.randrange(0, 500)))
    path = tmp_path / "run-x.wandb"
    path.write_bytes(bytes(data))
    run_cli(["curves", path], [path.name])


@pytest.fixture(scope="module")
def dcp_checkpoint(tmp_path_factory) -> Path:
    from torch.distributed.checkpoint import save

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    folder = tmp_path_factory.mktemp("dcp") / "step-5"
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that it runs without a process group
        save(state, checkpoint_id=str(folder))
    return folder


@pytest.mark.parametrize("seed", DCP_CASES)
def test_broken_dcp_folders(dcp_checkpoint, tmp_path, seed):
    import pickle

    rng = random.Random(4_000_000 + seed)
    folder = tmp_path / "step-5"
    shutil.copytree(dcp_checkpoint, folder)
    meta, (shard,) = folder / ".metadata", list(folder.glob("*.distcp"))
    choice = rng.randrange(5)
    if choice == 0:
        meta.write_bytes(meta.read_bytes()[: rng.randrange(meta.stat().st_size)])
    elif choice == 1:
        data = bytearray(meta.read_bytes())
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        meta.write_bytes(bytes(data))
    elif choice == 2:
        meta.write_bytes(pickle.dumps(rng.choice([Pwned(), {"a": 1}, [Pwned()]])))
    elif choice == 3:
        shard.write_bytes(shard.read_bytes()[: rng.randrange(shard.stat().st_size)])
    else:
        data = bytearray(shard.read_bytes())
        for _ in range(rng.randrange(1, 10)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
    command = rng.choice(
        [["inspect", folder], ["timeline", tmp_path, "--checkpoints", "step-{step}"]]
    )
    run_cli(command, [folder.name, meta.name, shard.name])
