"""Distributed runs as teams write them (issue 22), on CPU with gloo and 4 ranks: a plain module
trained by every rank, a DDP run replayed by fewer processes than recorded it, and an
exception on one rank. Every run is recorded by a hand-written loop in tests/dist_workers.py."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from energydiag.cli import app
from energydiag.errors import DiagError, OptionError
from energydiag.io.rundir import Run

pytestmark = [
    pytest.mark.heavy,
    pytest.mark.skipif(
        not __import__("torch").distributed.is_gloo_available(), reason="no gloo backend"
    ),
]
WORLD = 4


@pytest.fixture(scope="module")
def own_copies(tmp_path_factory):
    """The seed team's script: EnergyModel(...) on every rank, never wrapped; 4 × 3 samples."""
    import dist_workers

    root = tmp_path_factory.mktemp("copies") / "run"
    dist_workers.spawn(WORLD, dist_workers.unsynced_recorded, str(root), 48)
    return root


@pytest.fixture(scope="module")
def ddp_on_4(tmp_path_factory):
    """DDP on 4 ranks; at step 5 rank 1 alone gets a sample whose pad_mask masks every key."""
    import dist_workers

    root = tmp_path_factory.mktemp("ddp4") / "run"
    dist_workers.spawn(WORLD, dist_workers.ddp_recorded, str(root), 5, "inbatch_infonce", False)
    return root


def test_a_plain_module_records_on_every_rank_with_its_own_checkpoints(own_copies):
    run = Run(own_copies)
    assert run.manifest.distributed == {
        "world_size": 4,
        "backend": "gloo",
        "parallelism": "none",
        "sync": {"": "none"},
        "rank_checkpoints": True,
    }
    copies = [Run(own_copies, rank=r).checkpoint(16).model for r in range(WORLD)]
    assert all(c.keys() == copies[0].keys() for c in copies)
    weight = "pred.1.weight"
    assert len({tuple(c[weight].flatten().tolist()) for c in copies}) == WORLD  # 4 models
    checks = run.rank_checks()
    assert [(c["step"], c["equal"]) for c in checks[:2]] == [(0, True), (10, False)]
    assert checks[1]["ranks"] == [1, 2, 3] and checks[1]["max_relative"] > 0.01


def test_diagnose_names_the_divergence_the_effective_batch_and_verifies_the_remedy(own_copies):
    result = CliRunner().invoke(app, ["diagnose", str(own_copies), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "ranks out of sync"
    found = {f["code"]: f for f in data["findings"]}
    diverged = found["ranks.diverged"]["evidence"]
    assert (diverged["first_step"], diverged["last_equal_step"]) == (10, 0)
    assert diverged["cause"] == "no gradient sync" and diverged["layers"]
    assert "no gradient sync: the model is not wrapped in DDP" in found["ranks.diverged"]["title"]
    assert found["ranks.negatives"]["title"] == (
        "each rank trains its own copy on B_local = 3 samples: 2 negatives per positive "
        "(chance log 3 = 1.10) instead of 11 (log 12 = 2.48)"
    )
    assert "contrastive.few_negatives" not in found  # the same fact, said once, by its cause
    verification = found["story.chain"]["evidence"]["verification"]
    assert verification["code"] == "remedy.verified"
    assert verification["evidence"]["variant"] == "gather=all"
    assert verification["evidence"]["variant_result"]["candidates"] == 12
    assert verification["evidence"]["baseline"]["candidates"] == 3


def test_whatif_plays_the_recorded_ranks_as_ddp_or_with_gathered_negatives(own_copies):
    from energydiag.analyses.variants import parse_variant
    from energydiag.analyses.whatif import whatif

    tries = [parse_variant("ddp"), parse_variant("gather=all")]
    report = whatif(Run(own_copies), 0, 8, tries)
    base, ddp, gather = (
        next(r for r in report.results if r.label == k) for k in ("baseline", "ddp", "gather=all")
    )
    assert (base.candidates, ddp.candidates, gather.candidates) == (3, 3, 12)
    # step 0 starts from the same weights: DDP's loss is rank 0's own, the joined batch's is not
    assert ddp.losses[0] == base.losses[0] and gather.losses[0] != base.losses[0]
    assert ddp.losses[1:] != base.losses[1:]  # the averaged gradient moved the weights differently
    with pytest.raises(OptionError, match="recorded by one process"):
        whatif(_single_process_run(own_copies.parent), 0, 2, tries[:1])


def _single_process_run(folder):
    """A one-process run recorded by the hand-written loop."""
    import handloop

    return Run(handloop.train(folder / "single", steps=3, checkpoint_every=2).root)


def test_each_ranks_copy_replays_bit_exact_in_one_process(own_copies):
    from energydiag.analyses.rank_replay import replay_ranks

    report = replay_ranks(str(own_copies), 16, 31, nproc=WORLD).to_json()
    assert report["placement"] == "each of the 4 ranks' own copies replayed in turn in one process"
    assert [r["bit_exact"] for r in report["ranks"]] == [True] * WORLD
    assert report["fidelity"]["expected"] == "bit-exact"  # nothing was reduced across ranks


def test_a_4_rank_ddp_run_replays_on_4_2_and_1_processes_to_the_same_fault(ddp_on_4):
    from energydiag.analyses.rank_replay import replay_ranks

    seen = {}
    for nproc in (WORLD, 2, 1):
        report = replay_ranks(str(ddp_on_4), 4, None, nproc=nproc).to_json()
        fault = report["fault"]
        seen[nproc] = (
            fault["rank"],
            fault["step"],
            fault["phase"],
            fault["module"],
            fault["op"]["op"],
        )
        if nproc == 1:
            fidelity = report["fidelity"]
            assert report["placement"] == "4 recorded ranks played by 1 process(es)"
            assert fidelity["expected"] == "approximate"
            assert any("played in turn by one process" in e for e in fidelity["environment"])
            assert fidelity["max_relative_deviation"] < 1e-5  # rounding, measured, not hidden
    assert seen[WORLD] == seen[2] == seen[1] == (1, 5, "forward", "attn", "aten::_softmax")
    with pytest.raises(OptionError, match="use 4 or a divisor"):
        replay_ranks(str(ddp_on_4), 4, None, nproc=3)


def test_every_ranks_log_and_the_replicas_agreeing(ddp_on_4):
    from energydiag.analyses.rank_logs import rank_findings
    from energydiag.analyses.variants import parse_variant
    from energydiag.analyses.whatif import whatif

    data = json.loads(CliRunner().invoke(app, ["curves", str(ddp_on_4), "--json"]).stdout)
    assert [r["rank"] for r in data["ranks"]] == [0, 1, 2, 3]
    assert data["ranks"][1]["first_nonfinite_loss"] == 5
    assert all(c["equal"] for c in Run(ddp_on_4).rank_checks())  # DDP kept them equal
    assert {f.code for f in rank_findings(Run(ddp_on_4))} == {"ranks.first_nonfinite"}
    with pytest.raises(OptionError, match="already averages its gradients with DDP"):
        whatif(Run(ddp_on_4), 0, 2, [parse_variant("ddp")])


def test_an_exception_on_rank_2_leaves_every_ranks_ring_on_disk(tmp_path):
    import dist_workers
    from torch.multiprocessing import ProcessRaisedException

    with pytest.raises(ProcessRaisedException, match="illegal memory access"):
        dist_workers.spawn(WORLD, dist_workers.raises_on_rank_2, str(tmp_path), 5)
    assert Run(tmp_path, rank=2).batch_steps == [3, 4, 5]  # keep_batches=3
    for rank in (0, 1, 3):
        # A rank told while still between steps 4 and 5 keeps the ring it had then (2-4), and
        # adds 5 if its own all-reduce then fails before the launcher stops it.
        steps = Run(tmp_path, rank=rank).batch_steps
        assert steps in ([3, 4, 5], [2, 3, 4], [2, 3, 4, 5]), (rank, steps)
    own = json.loads((tmp_path / "failure.rank-2.json").read_text())
    assert (own["reason"], own["checkpoint"], own["ranks_without_dump"]) == ("exception", 5, [])
    for name in ("failure.json", "failure.rank-1.json", "failure.rank-3.json"):
        told = json.loads((tmp_path / name).read_text())
        assert (told["reason"], told["raised_on"]) == ("rank 2 raised", 2)
        # the step it was in, with that step's batch last in its ring
        assert told["step"] in (4, 5) and told["batches_from"] == told["step"] - 2
        assert told["checkpoint"] is None  # mid-step on that rank: only regular checkpoints


def test_rank_divergence_tells_rounding_from_a_rank_local_change():
    from energydiag import findings as rules

    def checks(relative):
        return [
            {"step": 0, "equal": True, "ranks": [], "max_relative": 0.0, "layers": {}},
            {
                "step": 10,
                "equal": False,
                "ranks": [2],
                "max_relative": relative,
                "layers": {"head.weight": relative},
            },
        ]

    noise = rules.rank_divergence(checks(3e-8), "ddp", 4, [])
    assert (noise.severity, noise.evidence["cause"]) == ("info", "reduction order")
    local = rules.rank_divergence(checks(0.2), "ddp", 4, [])
    assert (local.severity, local.evidence["cause"]) == ("error", "rank-local change")
    assert local.commands[0].options == {"from_step": 0}
    mixed = rules.rank_divergence(checks(0.2), "mixed", 4, ["energy", ""])
    assert "'energy' is not wrapped" in mixed.title
    assert rules.rank_divergence(checks(0.2)[:1], "ddp", 4, []) is None


def test_bad_rank_records_and_settings_are_one_line(tmp_path):
    from energydiag.analyses.variants import parse_variant
    from energydiag.io.manifest import parse_manifest
    from energydiag.io.rank_checks import read_rank_checks

    (tmp_path / "ranks.jsonl").write_text('{"step": 0, "equal": true}\n')
    with pytest.raises(DiagError, match="line 1: missing or mistyped ranks, max_relative"):
        read_rank_checks(tmp_path / "ranks.jsonl")
    (tmp_path / "ranks.jsonl").write_text("{not json\n")
    with pytest.raises(DiagError, match="line 1 is not JSON"):
        read_rank_checks(tmp_path / "ranks.jsonl")
    with pytest.raises(OptionError, match="cannot use 'some' for gather"):
        parse_variant("gather=some")
    base = {
        "model": {"target": "energydiag.reference.models:EnergyModel"},
        "loss": {"name": "inbatch_infonce"},
        "optimizer": {"name": "AdamW"},
        "format": "energydiag/2",
    }
    plain = {"world_size": 4, "backend": "gloo", "parallelism": "none", "sync": {"": "none"}}
    assert parse_manifest({**base, "distributed": plain}, "x").rank_copies
    with pytest.raises(DiagError, match="distributed must be null"):
        parse_manifest({**base, "distributed": {**plain, "sync": {"": "allreduce"}}}, "x")


def test_the_manifest_says_which_parameters_are_synchronised_and_how():
    """A container whose policy is DDP-wrapped and whose energy head is not: 'mixed'."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from energydiag.engine.ranks import check_world, synchronisation

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        policy = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        both = nn.ModuleDict({"policy": policy, "energy": nn.Linear(2, 1)})
        assert synchronisation(both) == {"policy": "ddp", "": "none"}
        assert synchronisation(policy) == {"": "ddp"}
        assert synchronisation(nn.Linear(2, 1)) == {"": "none"}
        assert synchronisation(nn.ModuleDict({"policy": policy})) == {"policy": "ddp"}
        del policy, both
    finally:
        dist.destroy_process_group()
    with pytest.raises(DiagError, match="partly wrapped"):
        check_world({"world_size": 2, "backend": "gloo", "parallelism": "mixed"})
    assert torch.distributed.is_initialized() is False
