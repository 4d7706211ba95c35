"""`energydiag diff` (issue 23, first part): per-op fingerprints of one replayed step on two
sides, paired by phase, module, op and occurrence; the first pair that differs, whether its
inputs agreed, and the float64 re-run of that op on each side's inputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import FIXTURES
from diffruns import STEP, edited_copy, one_ulp_up, perturbed_copy, split_copy
from typer.testing import CliRunner

from energydiag.analyses import numerics_diff
from energydiag.analyses.numerics_diff import fingerprint_step
from energydiag.cli import app
from energydiag.io.rundir import Run
from energydiag.reference import models
from energydiag.reference.synthetic import Task

runner = CliRunner()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The healthy fixture, and a copy whose act_in.weight[0, 3] is one ulp larger at STEP."""
    root = tmp_path_factory.mktemp("diff")
    shutil.copytree(FIXTURES / "healthy", root / "a")
    return root / "a", perturbed_copy(root / "b", FIXTURES / "healthy", STEP)


def diff(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["diff", *args, "--step", str(STEP), "--json"])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def test_one_ulp_in_one_weight_is_named_where_it_is_first_read(runs):
    code, report = diff(str(runs[0]), str(runs[1]))
    first = report["first_divergence"]
    assert code == 1 and report["unmatched"] == [0, 0]
    assert (first["phase"], first["module"], first["op"]) == ("forward", "act_in", "aten::addmm")
    assert first["micro_batch"] == 1 and first["step"] == STEP
    assert first["differing_inputs"] == ["weight 'act_in.weight'"] and first["inputs_matched"]
    assert report["verdict"] == "the sides start apart: weight 'act_in.weight' differs"
    assert report["replayed_from"] == [STEP, STEP]


def test_the_same_run_twice_is_identical(runs):
    code, report = diff(str(runs[0]), str(runs[0]))
    assert code == 0 and report["verdict"] == "identical" and report["first_divergence"] is None
    watched_everything(report)


def watched_everything(report: dict) -> None:
    """Every module output, the loss, every gradient and every parameter after the step were
    compared, and nothing op by op: the sides never parted."""
    manifest = json.loads((FIXTURES / "healthy" / "run.json").read_text())
    params = sum(1 for _ in models.EnergyModel(**manifest["model"]["kwargs"]).parameters())
    assert report["level"] == "module" and report["named_in"] is None
    assert report["ops"][0] == report["ops"][1] == report["aligned"] >= 2 * params + 1


def test_a_step_is_fingerprinted_op_by_op_only_where_the_watch_saw_the_sides_part(
    runs, monkeypatch
):
    """Alike, the sides are watched by module hooks alone (about 1.3x a plain step where every
    op costs 2x); apart at the weight act_in reads, each side's step is played once more with
    only its forward's ops fingerprinted (and the ops after a backward pass, which may be a
    later micro-batch's forward)."""
    made = []
    real = numerics_diff.Fingerprints
    monkeypatch.setattr(numerics_diff, "Fingerprints", lambda *a: made.append(a[2]) or real(*a))
    assert diff(str(runs[0]), str(runs[0]))[1]["verdict"] == "identical" and made == []
    code, report = diff(str(runs[0]), str(runs[1]))
    assert code == 1 and made == [frozenset({"forward", "after-backward"})] * 2
    assert report["level"] == "op" and report["named_in"] == "forward"
    whole = fingerprint_step(Run(runs[0]), STEP, torch.device("cpu")).prints
    forward = [p for p in whole if p.phase in ("forward", "after-backward")]
    assert report["ops"] == [len(forward), len(forward)] and len(forward) < len(whole) / 3


@pytest.fixture
def opened(monkeypatch) -> list[int]:
    """The step of every side's session `diff` opens (each one a replay)."""
    from energydiag.analyses import diff_shadow, diff_variants

    steps = []
    real = diff_variants.side_session

    def counted(run, step, *args, **kwargs):
        steps.append(step)
        return real(run, step, *args, **kwargs)

    monkeypatch.setattr(numerics_diff, "side_session", counted)
    monkeypatch.setattr(diff_shadow, "side_session", counted)
    return steps


def test_an_op_born_in_the_module_the_watch_saw_is_found_in_two_replays_a_side(runs, opened):
    """Watched, then the forward op by op: act_in's own ops are copied on that second replay,
    so its addmm is re-run in float64 from there, with no third replay to capture it."""
    code, report = diff(str(runs[0]), str(runs[1]))
    shadow = report["first_divergence"]["shadow"]
    assert code == 1 and opened == [STEP] * 4
    assert (
        shadow["error_a"] == pytest.approx(shadow["error_b"], rel=0.1) and shadow["error_a"] < 1e-7
    )


def test_a_difference_in_a_later_micro_batch_is_named_with_it(tmp_path):
    """Gradient accumulation over 4 micro-batches (a hand-written loop): one ulp more in a
    value of sample 9, which only micro-batch 3 reads, at step 6. Both runs replay from their
    checkpoint 4; the first op apart is the loss's B x B replication of micro-batch 3's contexts
    (a slice is a view, with no op of its own), after two backward passes, with those contexts
    as the input that differs."""
    from handloop import train_accumulating

    def nudged(step, batch):
        if step == 6:
            one_ulp_up(batch["h"][9, 0])  # in place: h[9, 0, 0]

    a = train_accumulating(tmp_path / "a", steps=7)
    b = train_accumulating(tmp_path / "b", nudged, steps=7)
    result = runner.invoke(app, ["diff", str(a), str(b), "--step", "6", "--json"])
    report, first = json.loads(result.stdout), json.loads(result.stdout)["first_divergence"]
    assert result.exit_code == 1 and report["replayed_from"] == [4, 4]
    assert (first["phase"], first["micro_batch"], first["module"], first["op"]) == (
        "after-backward",
        3,
        "",
        "aten::clone",
    )
    assert first["differing_inputs"] == ["input 0"]
    shown = runner.invoke(app, ["diff", str(a), str(b), "--step", "6"]).stdout
    assert "aten::clone, outside every module (after-backward, micro-batch 3, occurrence" in shown


@pytest.fixture(scope="module")
def moment_apart(runs, tmp_path_factory):
    """The healthy fixture with act_in.weight's first Adam moment one ulp larger at STEP."""
    checkpoint = f"checkpoints/step-{STEP:08d}.safetensors"
    key = "optim.act_in.weight.exp_avg"
    return edited_copy(
        tmp_path_factory.mktemp("moment") / "b", runs[0], checkpoint, key, one_ulp_up
    )


def test_a_difference_born_in_the_optimizer_is_named_there(runs, moment_apart, opened):
    """One ulp in act_in.weight's Adam moment: forward, backward and the parameter it moves
    agree to the bit (the change is below the weight's float32 resolution), the watch sees the
    sides part at the moment the step leaves, and the optimizer's ops are then fingerprinted:
    the first to read that moment is named, the moment as the input that differs. The sides
    started apart, so no third replay captures the op for a float64 re-run."""
    code, report = diff(str(runs[0]), str(moment_apart))
    first = report["first_divergence"]
    assert code == 1 and report["named_in"] == "optimizer" and first["phase"] == "optimizer"
    assert opened == [STEP] * 4 and first["shadow"] is None
    assert first["micro_batch"] is None  # after the last backward pass: of no micro-batch
    assert not first["inputs_matched"] and first["differing_inputs"]
    assert report["verdict"].startswith("the sides start apart: input")
    apart = {m["module"]: m["phase"] for m in report["modules"] if m["largest"] > 0}
    assert apart == {"act_in": "optimizer"}


def test_a_part_the_second_replay_does_not_repeat_is_reported_as_the_watch_saw_it(
    runs, moment_apart, monkeypatch
):
    """Should every op of the phase the watch saw part agree when replayed (a kernel that is not
    deterministic), no op is named: the watch's own first difference is the answer, its entry
    and phase, with no float64 re-run (a moment has no module to re-run)."""
    monkeypatch.setitem(numerics_diff.NAMED_IN, "optimizer", frozenset({"forward"}))
    code, report = diff(str(runs[0]), str(moment_apart))
    first = report["first_divergence"]
    assert code == 1 and report["level"] == "module" and report["named_in"] is None
    assert (first["phase"], first["module"], first["op"]) == (
        "optimizer",
        "act_in",
        "exp_avg act_in.weight",
    )
    assert first["shadow"] is None and report["verdict"] == "differ (no float64 re-run)"


def test_default_kernels_against_deterministic_ones_agree_on_the_cpu(runs):
    """deterministic=off: side A asks torch for deterministic kernels, side B does not; the
    CPU's kernels are deterministic either way (on CUDA the scatter and index ops differ)."""
    code, report = diff(str(runs[0]), "--against", "deterministic=off")
    assert (
        code == 0 and report["verdict"] == "identical" and report["against"] == "deterministic=off"
    )
    assert not torch.are_deterministic_algorithms_enabled()  # both sides put it back


def test_other_threads_are_reduction_order_noise(runs):
    threads = 1 if torch.get_num_threads() > 1 else 2
    code, report = diff(str(runs[0]), "--against", f"threads={threads}")
    assert code == 0 and report["verdict"] in ("identical", "reduction-order noise")
    if report["verdict"] == "reduction-order noise":
        first = report["first_divergence"]
        assert first["inputs_matched"] and first["differing_inputs"] == []
        assert max(first["shadow"].values()) < 1e-5 and first["relative"] < 1e-5


def test_two_threads_part_from_one_in_the_backward_as_reduction_order_noise(tmp_path, opened):
    """A model wide enough for two threads to split its reductions (the benchmark's), recorded by
    a plain loop: the step parts in the backward, where a layer norm's backward sums over the
    rows in another order. The op is copied as it runs on the second replay (it is credited to
    the module whose gradient the watch saw apart), so its float64 re-run takes no third."""
    from handloop import train

    model = {
        "d_model": 128,
        "n_heads": 4,
        "n_blocks": 2,
        "d_context": 256,
        "d_action": 7,
        "horizon": 8,
    }
    task = Task(batch=8, seq=32, d_context=256, horizon=8, d_action=7)
    root = train(tmp_path / "run", steps=1, checkpoint_every=1, model_kwargs=model, task=task).root
    threads = 1 if torch.get_num_threads() > 1 else 2
    args = ["diff", str(root), "--against", f"threads={threads}", "--step", "0", "--json"]
    result = runner.invoke(app, args)
    report = json.loads(result.stdout)
    first = report["first_divergence"]
    assert result.exit_code == 0 and report["verdict"] == "reduction-order noise"
    assert (report["named_in"], first["phase"]) == ("backward", "backward")
    assert first["inputs_matched"] and not first["differing_inputs"]
    assert 0 < first["relative"] < 1e-5 and max(first["shadow"].values()) < 1e-5
    assert opened == [0] * 4


def test_bf16_autocast_is_the_less_accurate_side(runs):
    code, report = diff(str(runs[0]), "--against", "autocast=bf16")
    first = report["first_divergence"]
    assert code == 1 and report["verdict"] == "B is less accurate"
    assert first["relative"] > report["tolerance"] == pytest.approx(2 * 2**-7)
    assert first["shadow"]["error_b"] > 100 * first["shadow"]["error_a"]
    assert report["unmatched"][1] > 0  # autocast's casts have no partner on the float32 side


def test_bf16_weights_and_inputs_are_the_less_accurate_side(runs):
    """dtype=bf16 casts B's parameters, optimizer state and batch: the first op whose output
    leaves float32's tolerance (2 bf16 eps) is named with matched inputs, and its float64
    re-run says bf16 is the less accurate side."""
    code, report = diff(str(runs[0]), "--against", "dtype=bf16")
    first = report["first_divergence"]
    assert code == 1 and report["verdict"] == "B is less accurate"
    assert (first["phase"], first["op"]) == ("forward", "aten::addmm") and first["inputs_matched"]
    assert first["relative"] > report["tolerance"] == pytest.approx(2 * 2**-7)
    assert first["shadow"]["error_b"] > 100 * first["shadow"]["error_a"]


def test_a_model_that_casts_to_float32_itself_is_refused_dtype_in_one_line(tmp_path):
    from handloop import train

    root = train(tmp_path / "run", steps=1, checkpoint_every=1, model="faulty:OwnFloat32Model").root
    result = runner.invoke(app, ["diff", str(root), "--against", "dtype=bf16", "--step", "0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the model casts to another dtype itself" in result.output
    assert "autocast=bf16" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--against", "dtype=int8"], "use threads=K"),
        ([], "give a second run, or a variant"),
    ],
)
def test_what_diff_cannot_do_is_one_line(runs, args, problem):
    result = runner.invoke(app, ["diff", str(runs[0]), *args, "--step", str(STEP)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert problem in result.output and len(result.output.strip().splitlines()) == 1


def test_the_html_page_shows_the_first_diverging_op_and_is_not_overwritten(runs, tmp_path):
    page = tmp_path / "diff.html"
    args = ["diff", str(runs[0]), str(runs[1]), "--step", str(STEP), "--html", str(page)]
    assert runner.invoke(app, args).exit_code == 1
    text = page.read_text()
    assert "the sides start apart: weight &#x27;act_in.weight&#x27; differs" in text
    assert "aten::addmm in &#x27;act_in&#x27;" in text and "<svg" in text and "http" not in text
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 1


def test_a_step_range_reports_the_first_step_that_differs(runs, tmp_path):
    """A copy whose batch of step STEP + 2 differs in one element by one ulp: steps STEP and
    STEP + 1 replay identical on both sides, and step STEP + 2 is where they start apart, at
    the first op that reads the batch."""
    batch = f"batches/step-{STEP + 2:08d}.safetensors"
    other = edited_copy(tmp_path / "b", runs[0], batch, "h", one_ulp_up)
    span = ["--steps", f"{STEP}..{STEP + 4}", "--json"]
    result = runner.invoke(app, ["diff", str(runs[0]), str(other), *span])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["steps"] == [STEP, STEP + 2] == [STEP, report["step"]]
    first = report["first_divergence"]
    assert first["phase"] == "forward" and first["differing_inputs"] == ["input 0"]
    assert not first["inputs_matched"]
    same = runner.invoke(app, ["diff", str(runs[0]), str(runs[0]), *span])
    assert same.exit_code == 0 and json.loads(same.stdout)["steps"] == [STEP, STEP + 4]


@pytest.mark.parametrize(
    "span, problem", [("5..2", "use N..M with N <= M"), ("150..170", "missing batches")]
)
def test_a_bad_step_range_is_one_line(runs, span, problem):
    result = runner.invoke(app, ["diff", str(runs[0]), str(runs[0]), "--steps", span])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert problem in result.output and len(result.output.strip().splitlines()) == 1


def test_bitwise_finds_two_swapped_values_that_a_norm_and_a_sum_cannot(runs, tmp_path):
    """Two values of the batch swapped in a copy: the float64 norm and sum of the batch agree,
    so without --bitwise the first difference shows up downstream with its inputs 'matched'
    (a semantic difference, misattributed); with --bitwise the first op that reads the batch
    is named, and the batch as the input that differs."""

    def swap(h: torch.Tensor) -> torch.Tensor:
        h[0, 0, [0, 1]] = h[0, 0, [1, 0]]
        return h

    other = edited_copy(tmp_path / "b", runs[0], f"batches/step-{STEP:08d}.safetensors", "h", swap)
    _, loose = diff(str(runs[0]), str(other))
    assert loose["first_divergence"]["inputs_matched"] and loose["verdict"] == "semantic difference"
    code, strict = diff(str(runs[0]), str(other), "--bitwise")
    first = strict["first_divergence"]
    assert code == 1 and strict["bitwise"] and first["relative"] == 0.0
    assert first["differing_inputs"] == ["input 0"] and not first["inputs_matched"]
    assert strict["verdict"] == "the sides start apart: input 0 differs"
    assert diff(str(runs[0]), str(runs[0]), "--bitwise")[1]["verdict"] == "identical"
    result = runner.invoke(app, ["diff", str(runs[0]), "--against", "autocast=bf16", "--bitwise"])
    assert result.exit_code == 2 and "is compared within a tolerance" in result.output


def test_another_device_replays_side_b_there_and_allows_its_kernels_16_eps(runs):
    """device=D: side B's session opens on D (here the CPU again, so nothing may differ; on
    a machine with a GPU tests/test_cuda.py runs device=cuda)."""
    code, report = diff(str(runs[0]), "--against", "device=cpu")
    assert code == 0 and report["verdict"] == "identical" and report["against"] == "device=cpu"
    assert report["tolerance"] == pytest.approx(16 * torch.finfo(torch.float32).eps)
    watched_everything(report)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_one_line(runs):
    result = runner.invoke(app, ["diff", str(runs[0]), "--against", "device=cuda"])
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_a_value_computed_by_other_ops_pairs_by_statistics_and_the_rest_is_reported(tmp_path):
    """Side B's act_in sums its inner product in two halves (mm, mm, add, add) where A runs one
    addmm: A's addmm pairs with B's final add by statistics (as many elements, fingerprints
    close), the extra ops are listed as unpaired stretches in act_in only, and the 1e-8 they
    part by is rounding by the float64 re-run of each side's own op."""
    code, report = diff(str(FIXTURES / "healthy"), str(split_copy(tmp_path / "split")))
    first = report["first_divergence"]
    assert code == 0 and report["verdict"] == "reduction-order noise"
    assert (first["module"], first["op"], first["b_op"]) == ("act_in", "aten::addmm", "aten::add")
    assert first["paired_by"] == "statistics" and 0 < first["relative"] < 1e-6
    assert report["by_statistics"] > 0 and report["unmatched"][0] == 0
    stretches = report["unmatched_stretches"]
    assert sum(s["count"] for s in stretches) == report["unmatched"][1]
    # the backward's module credit varies where branches meet (see the fingerprints), so only
    # the forward's stretch is held to act_in
    assert {s["module"] for s in stretches if s["phase"] == "forward"} == {"act_in"}
    split = {"aten::mm", "aten::_unsafe_view", "aten::add", "aten::slice_backward"}
    assert {op for s in stretches for op in s["ops"]} <= split


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_runs_of_a_hand_written_loop_agree_with_themselves(tmp_path, seed):
    """Healthy controls: runs recorded by a plain loop (AdamW, clipping, a StepLR schedule),
    three seeds. Against itself over a range, every step is identical at every watched entry
    and no op is fingerprinted; against other threads, the step agrees (identical or
    reduction-order noise, never a semantic difference)."""
    from handloop import train

    def schedule(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)

    root = train(tmp_path / "run", steps=8, checkpoint_every=4, seed=seed, scheduler=schedule).root
    same = runner.invoke(app, ["diff", str(root), str(root), "--steps", "0..3", "--json"])
    report = json.loads(same.stdout)
    assert same.exit_code == 0 and report["verdict"] == "identical"
    assert report["steps"] == [0, 3] and report["level"] == "module"
    assert report["named_in"] is None and report["ops"][0] == report["aligned"] > 0
    threads = 1 if torch.get_num_threads() > 1 else 2
    args = ["diff", str(root), "--against", f"threads={threads}", "--step", "4", "--json"]
    other = runner.invoke(app, args)
    assert other.exit_code == 0
    assert json.loads(other.stdout)["verdict"] in ("identical", "reduction-order noise")
