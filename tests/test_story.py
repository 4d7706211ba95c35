"""One run, one story: planted causes recorded through a hand-written loop, told the same way by
diagnose, report, check, bisect and timeline, with the top remedy verified by replay."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from handloop import SMALL, train
from typer.testing import CliRunner

from energydiag.analyses.curves import analyse
from energydiag.cli import app
from energydiag.reference.losses import inbatch_infonce
from energydiag.reference.models import EnergyModel
from energydiag.reference.synthetic import Task, batches

pytestmark = pytest.mark.heavy

runner = CliRunner()


def cli_json(*args: object) -> tuple[int, dict]:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def codes(findings: list[dict]) -> list[str]:
    return [f["code"] for f in findings]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Every planted run, recorded once for the module."""
    root = tmp_path_factory.mktemp("story")

    def warm_up_too_high(optimizer):  # peaks at ×5e4 the configured lr
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(5e4, 500.0 * (s + 1)))

    def one_step_spike(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1e30 if s == 30 else 1.0)

    def offset_context(step, net, batch):
        batch["h"].add_(40.0)

    recipes = {
        "ramp": dict(steps=130, lr=5e-4, weight_decay=0.1, scheduler=warm_up_too_high,
                     checkpoint_every=20),
        "spike": dict(steps=50, lr=1e-3, scheduler=one_step_spike, checkpoint_every=10),
        "offset": dict(steps=100, lr=1e-3, checkpoint_every=20,
                       model_kwargs={"head": "sigmoid"}, plant=offset_context),
        "few_negatives": dict(steps=100, lr=1e-3, checkpoint_every=20,
                              model_kwargs={"head": "identity"}, task=Task(batch=3)),
    }  # fmt: skip
    for name, recipe in recipes.items():
        train(root / name, **recipe)
    return root


def story_of(run) -> tuple[int, dict, dict]:
    code, diagnosis = cli_json("diagnose", run)
    chain = diagnosis["findings"][0]
    assert chain["code"] == "story.chain", codes(diagnosis["findings"])
    return code, diagnosis, chain


def remedies(diagnosis: dict) -> str:
    return " ".join(f["remedy"] for f in diagnosis["findings"]).lower()


@pytest.mark.parametrize(
    ("name", "planted_words", "variant"),
    [
        ("ramp", ["lr 0.25 → 25", "×5e+04 its initial_lr 0.0005", "1 − lr·wd = "], "lr=0.0005"),
        ("spike", ["×1e+30 its initial_lr 0.001"], "lr=0.001"),
    ],
)
def test_an_lr_cause_is_named_with_its_numbers_and_its_fix_verified(
    planted, name, planted_words, variant
):
    run = planted / name
    failed = next(json.loads(line) for line in (run / "metrics.jsonl").open()
                  if not math.isfinite(json.loads(line)["loss"]))  # fmt: skip
    code, diagnosis, chain = story_of(run)
    assert code == 1 and diagnosis["verdict"] == "non-finite"
    step = diagnosis["fault"]["step"]
    assert step <= failed["step"]
    for words in planted_words:
        assert words in chain["title"], chain["title"]
    assert f"at step {step}" in chain["title"]
    verified = chain["evidence"]["verification"]
    assert verified["code"] == "remedy.verified" and f"with {variant}" in chain["remedy"]
    assert verified["evidence"]["variant_result"]["finite"]
    assert not verified["evidence"]["baseline"]["finite"]
    assert "schedule.lr_beyond_configured" in codes(diagnosis["findings"])

    # every command tells the same story about the same run
    code, page = cli_json("report", run, "-o", run / "report.html", "--force")
    assert code == 1 and page["diagnosis"]["verdict"] == "non-finite"
    assert page["diagnosis"]["fault"]["step"] == step
    assert codes(page["diagnosis"]["findings"]) == codes(diagnosis["findings"])
    code, gate = cli_json("check", run)
    # the log's first non-finite step; the replay may place the fault one update earlier
    assert code == 1 and gate["measurements"]["first_nonfinite_step"] == failed["step"]
    status = {c["name"]: c["status"] for c in gate["checks"]}
    assert status["no_nonfinite"] == "failed" and status["schedule"] == "failed"
    code, search = cli_json("bisect", run)
    assert code == 1 and search["first_nonfinite_step"] == step
    assert "schedule.lr_beyond_configured" in codes(search["findings"])
    code, line = cli_json("timeline", run)
    assert code == 1
    bad = [r["step"] for r in line["rows"] if r["state"] in ("exploded", "non-finite")]
    assert bad and bad[0] <= step + 1


def test_the_ramp_names_the_decay_factor_and_the_growth(planted):
    _, _, chain = story_of(planted / "ramp")
    links = [link["what"] for link in chain["evidence"]["links"]]
    assert links[0].startswith("lr 0.25 → 25")
    assert any(w.startswith("AdamW decay factor 1 − lr·wd = ") for w in links)
    assert any(w.startswith("max|w| ×") and "every value finite" in w for w in links)
    assert links[-1].startswith("NaN at step")


def test_a_constant_input_offset_is_the_cause_of_a_saturated_stall(planted):
    code, diagnosis, chain = story_of(planted / "offset")
    assert code == 1 and diagnosis["verdict"] == "stalled" and diagnosis["fault"] is None
    links = [link["what"] for link in chain["evidence"]["links"]]
    assert links[0].startswith("'h' offset by ~40")
    assert any("sigmoid 100% saturated" in w for w in links)
    assert "normalise 'h'" in chain["remedy"]
    assert chain["evidence"]["verification"]["code"] == "remedy.verified"
    assert "un-saturates the head (100% → 0%" in chain["remedy"]
    said = remedies(diagnosis)
    assert "lower the learning rate" not in said and "lower lr" not in said
    assert "cast h to float32" not in said
    _, gate = cli_json("check", planted / "offset")
    status = {c["name"]: c["status"] for c in gate["checks"]}
    assert status["curve_health"] == "failed" and status["saturation"] == "failed"
    assert status["no_nonfinite"] == status["not_exploded"] == status["schedule"] == "passed"
    # the other views agree: nothing broke, nothing to bisect, the same verdict on the page
    code, page = cli_json("report", planted / "offset", "-o", planted / "offset.html", "--force")
    assert code == 1 and page["diagnosis"]["verdict"] == "stalled"
    assert codes(page["diagnosis"]["findings"])[0] == "story.chain"
    code, search = cli_json("bisect", planted / "offset")
    assert code == 0 and search["first_bad_step"] is None and search["first_bad_checkpoint"] is None
    code, line = cli_json("timeline", planted / "offset")
    assert code == 0 and {r["state"] for r in line["rows"]} == {"ok"}


def test_too_few_negatives_on_an_unbounded_head_is_not_told_to_widen_its_range(planted):
    code, diagnosis, chain = story_of(planted / "few_negatives")
    assert code == 1 and diagnosis["verdict"] == "stalled"
    assert chain["evidence"]["links"][0]["what"] == "only 2 negative(s) per positive (B = 3)"
    assert "raise the negatives per positive" in chain["remedy"]
    # the same logged data, three batches a step: judged against each side's own chance
    verified = chain["evidence"]["verification"]
    assert verified["code"] == "remedy.verified" and "with batch*=3" in chain["remedy"]
    assert "of its chance log(9)" in chain["remedy"]
    assert "widen the energy range" not in remedies(diagnosis)
    assert "contrastive.few_negatives" in codes(diagnosis["findings"])


def healthy_losses(seed: int, steps: int = 200) -> pd.DataFrame:
    """A hand-written healthy loop at B = 8, lr 1e-3: ordinary small-batch noise."""
    torch.manual_seed(seed)
    net = EnergyModel(**{**SMALL, "head": "softplus"})
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = batches(Task(), seed=100 + seed)
    rows = []
    for step in range(steps):
        optimizer.zero_grad()
        loss, _ = inbatch_infonce(net, next(data), tau=0.5)
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        rows.append({"step": step, "loss": loss.item()})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(20))
def test_twenty_healthy_seeds_raise_no_oscillation_or_erratic_warning(seed):
    """One test per seed, so that the parallel workers share the twenty."""
    noisy = {"curve.oscillation", "curve.unstable", "curve.plateau_at_chance"}
    bounds = {"chance": math.log(8), "batch_size": 8}
    frame = healthy_losses(seed)
    found = {f.code for f in analyse(frame, "loss", bounds=bounds).findings}
    assert not found & noisy, (seed, found)
    assert frame["loss"].iloc[-20:].mean() < frame["loss"].iloc[:20].mean() - 0.3


def test_a_noisy_stall_within_noise_of_chance_is_a_plateau_at_chance():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {"step": np.arange(200), "loss": math.log(8) + rng.uniform(-0.07, 0.13, 200)}
    )
    report = analyse(frame, "loss", bounds={"chance": math.log(8), "batch_size": 8})
    assert report.plateau_on == "chance"
    assert "curve.plateau_at_chance" in [f.code for f in report.findings]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_healthy_run_recorded_as_the_readme_shows_exits_0(tmp_path, seed):
    """keep_batches=16, no failure: no batch is persisted, so nothing can be replayed."""
    run = tmp_path / "run"
    train(run, steps=150, lr=3e-3, keep_batches=16, persist_batches=False, seed=seed,
          checkpoint_every=50, model_kwargs={"head": "softplus"})  # fmt: skip
    code, diagnosis = cli_json("diagnose", run)
    assert code == 0 and diagnosis["verdict"] in ("healthy", "unchecked"), diagnosis
    assert not {"curve.oscillation", "curve.unstable"} & set(codes(diagnosis["findings"]))
    if diagnosis["verdict"] == "unchecked":
        assert "run.no_batches" in codes(diagnosis["findings"])
    code, page = cli_json("report", run, "-o", tmp_path / "page.html")
    assert code == 0 and page["diagnosis"]["verdict"] == diagnosis["verdict"]
    # every other view of the same healthy run: a passing gate, nothing to bisect, no bad state
    code, gate = cli_json("check", run)
    assert code == 0 and gate["passed"] and gate["skipped"] > 0 and gate["unmeasured"]
    code, search = cli_json("bisect", run)
    assert code == 0 and search["first_bad_step"] is None and search["findings"] == []
    code, line = cli_json("timeline", run)
    assert code == 0 and {r["state"] for r in line["rows"]} == {"ok"} and line["findings"] == []


def test_the_stalled_fixture_verifies_its_head_swap(fixtures_dir):
    code, diagnosis, chain = story_of(fixtures_dir / "stalled")
    assert code == 1 and diagnosis["verdict"] == "stalled"
    assert [link["stage"] for link in chain["evidence"]["links"]] == [3, 4]
    assert "verified: with head=softplus" in chain["remedy"]
    assert "un-saturates the head (100% → 0%" in chain["remedy"]


def test_a_slow_start_at_chance_that_then_learns_is_not_a_stall():
    rng = np.random.default_rng(1)
    loss = np.concatenate([np.full(60, math.log(8)), np.linspace(math.log(8), 1.0, 90)])
    frame = pd.DataFrame({"step": np.arange(150), "loss": loss + rng.normal(0, 0.002, 150)})
    report = analyse(frame, "loss", bounds={"chance": math.log(8), "batch_size": 8})
    found = {f.code: f for f in report.findings}
    assert "curve.plateau_at_chance" not in found and found["curve.slow_start"].severity == "info"
    stalled = pd.DataFrame(
        {"step": np.arange(150), "loss": np.full(150, math.log(8)) + rng.normal(0, 0.002, 150)}
    )
    assert "curve.plateau_at_chance" in {
        f.code
        for f in analyse(stalled, "loss", bounds={"chance": math.log(8), "batch_size": 8}).findings
    }
