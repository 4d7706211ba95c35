import pytest

from energydiag.analyses.whatif import parse_variant, whatif
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
