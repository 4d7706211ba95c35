import pytest
import torch

from energydiag.analyses.variants import parse_variant
from energydiag.analyses.whatif import whatif
from energydiag.errors import DiagError
from energydiag.io.rundir import Run


def test_parse_variants():
    v = parse_variant("head=softplus, tau=2, lr*=0.1, clip=none, warmup=5")
    assert (v.head, v.loss, v.lr_scale, v.clip, v.warmup) == (
        "softplus",
        {"tau": 2.0},
        0.1,
        None,
        5,
    )
    for bad in ("bogus=1", "head=tanh", "tau*=2", "tau"):
        with pytest.raises(DiagError):
            parse_variant(bad)


def test_stalled_fixture_ranks_a_wider_energy_range_above_a_flat_baseline(fixtures_dir):
    report = whatif(
        Run(fixtures_dir / "stalled"),
        40,
        30,
        [parse_variant("head=softplus"), parse_variant("tau=3"), parse_variant("lr*=0.1")],
    )
    by = {r.label: r for r in report.results}
    base, softplus = by["baseline"], by["head=softplus"]
    assert abs(base.loss_end - base.loss_start) < 1e-3  # the baseline stays flat
    assert softplus.rank < base.rank
    assert softplus.relative_drop > 0.01
    assert softplus.energy_span > 100 * base.energy_span
    assert softplus.input_layer_grad_norm > 100 * base.input_layer_grad_norm
    assert base.saturation == 1.0 and softplus.saturation == 0.0
    assert (
        report.findings[0].code == "whatif.best"
        and report.findings[0].evidence["best"] == "head=softplus"
    )


def test_variants_do_not_touch_the_run(fixtures_dir):
    before = {p: p.stat().st_mtime_ns for p in (fixtures_dir / "stalled").rglob("*")}
    whatif(Run(fixtures_dir / "stalled"), 40, 3, [parse_variant("head=identity")])
    assert before == {p: p.stat().st_mtime_ns for p in (fixtures_dir / "stalled").rglob("*")}


def test_warmup_skips_updates(fixtures_dir):
    report = whatif(Run(fixtures_dir / "healthy"), 100, 4, [parse_variant("warmup=4")])
    by = {r.label: r for r in report.results}
    # no update inside the window: every step sees the checkpoint's parameters
    assert by["warmup=4"].losses[0] == by["baseline"].losses[0]
    assert by["warmup=4"].losses[1:] != by["baseline"].losses[1:]


def test_unknown_head_path(fixtures_dir):
    with pytest.raises(DiagError, match="no such module"):
        whatif(
            Run(fixtures_dir / "stalled"),
            40,
            2,
            [parse_variant("head=softplus")],
            head_path="nope.out",
        )


@pytest.fixture(scope="module")
def scheduled_run(tmp_path_factory):
    """A hand-written loop with a LambdaLR warm-up: the lr changes every step."""
    from handloop import train

    root = tmp_path_factory.mktemp("sched") / "run"

    def ramp(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 10)

    train(root, steps=12, scheduler=ramp, checkpoint_every=4, lr=1e-2)
    return Run(root)


def test_lr_variants_override_the_recorded_schedule(scheduled_run):
    variants = [parse_variant(t) for t in ("lr=0", "lr*=0.1", "lr=1e-1", "warmup=6")]
    report = whatif(scheduled_run, 4, 6, variants)
    by = {r.label: r for r in report.results}
    base = by["baseline"]
    assert base.lrs == pytest.approx([1e-2 * (s + 1) / 10 for s in range(4, 10)])
    assert by["lr*=0.1"].lrs == pytest.approx([0.1 * lr for lr in base.lrs])
    assert by["lr=0"].lrs == [0.0] * 6 and by["lr=1e-1"].lrs == pytest.approx([0.1] * 6)
    # lr=0 freezes the parameters: every step sees the checkpoint's model, as with no update
    assert by["lr=0"].losses == by["warmup=6"].losses
    assert by["lr=0"].losses != base.losses
    assert by["lr*=0.1"].losses[1:] != base.losses[1:]


def test_tau_variant_measures_its_logit_spread_at_its_own_tau(fixtures_dir):
    report = whatif(Run(fixtures_dir / "healthy"), 100, 1, [parse_variant("tau=2")])
    by = {r.label: r for r in report.results}
    base, variant = by["baseline"], by["tau=2"]
    assert variant.energy_span == pytest.approx(base.energy_span)  # same model, same batch
    assert variant.logit_spread == pytest.approx(variant.energy_span / 2)
    assert base.logit_spread == pytest.approx(base.energy_span / 0.2)


def test_center_variant_recentres_an_input(fixtures_dir):
    run = Run(fixtures_dir / "healthy")
    assert parse_variant("center=h").center == ["h"]
    report = whatif(run, 100, 2, [parse_variant("center=h")])
    by = {r.label: r for r in report.results}
    assert by["center=h"].losses[0] != by["baseline"].losses[0]  # the first step already sees it
    with pytest.raises(DiagError, match="center=nope"):
        whatif(run, 100, 1, [parse_variant("center=nope")])


def test_batch_variant_scores_each_positive_against_k_batches(fixtures_dir):
    report = whatif(Run(fixtures_dir / "healthy"), 100, 3, [parse_variant("batch*=2")])
    by = {r.label: r for r in report.results}
    assert by["baseline"].candidates == 8 and by["batch*=2"].candidates == 16
    assert by["batch*=2"].losses[0] > by["baseline"].losses[0]  # chance log 16 > log 8
    for bad in ("batch*=0", "batch*=x", "tau*=2"):
        with pytest.raises(DiagError):
            parse_variant(bad)
