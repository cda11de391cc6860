"""Run outputs from the round records: plots, model card, terminal summary."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest

from server.outcome import RunOutcome
from server.report import (
    epsilon_references,
    few_shot_references,
    moving_average,
    summary_table,
    write_model_card,
    write_plots,
    write_report,
)
from server.round_log import Refusal, Rejection, RoundRecord, TrainStep, Worst, append_round, as_json
from shared.run_folder import (
    EPSILON_PLOT,
    FEW_SHOT_PLOT,
    HELDOUT_COMPARISON,
    META_MODEL,
    METRICS,
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    TRAIN_LOSS_PLOT,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# hospitals by the public names they chose; two that chose the same name are kept apart by node
TRAINING = ["st-olav", "h1 (node 5678)", "h1 (node 8812)"]
HELDOUT = ["hospital-000", "hospital-001"]


def round_record(r: int) -> RoundRecord:
    """A full record as the strategy writes it: accuracy rises, loss falls, epsilon accumulates."""
    sampled = TRAINING[: 2 + r % 2]
    return RoundRecord(
        round=r,
        eligible=len(sampled) + 1,
        sampled=len(sampled) + 1,
        participants=len(sampled),
        trained=sorted(sampled),
        released=sorted([*sampled, "node-9999"]),
        rejected=[Rejection("node-9999", "outer-grad 'head.weight' has non-finite values")],
        bytes_down=123456,
        bytes_up=123456,
        train=TrainStep(episodes=64.0, update_norm=0.1, lr=0.01, query_loss=0.7 - 0.05 * r),
        hospitals={
            h: {"balanced-accuracy": 0.5 + 0.04 * r + 0.02 * i, "queries": 120.0} for i, h in enumerate(sampled)
        },
        worst_hospital=Worst(sampled[0], 0.5 + 0.04 * r),
        heldout={
            h: {"accuracy": 0.55 + 0.03 * r, "balanced-accuracy": 0.5 + 0.03 * r - 0.05 * i, "auc": 0.6}
            for i, h in enumerate(HELDOUT)
        },
        heldout_mean={"accuracy": 0.55 + 0.03 * r, "balanced-accuracy": 0.475 + 0.03 * r, "auc": 0.6},
        heldout_worst=Worst(HELDOUT[1], 0.45 + 0.03 * r),
        epsilon={h: 1.5 * r + i for i, h in enumerate(sampled)},
        dp={h: True for h in sampled},
        epsilon_max=1.5 * r + len(sampled) - 1,
        site_epsilon=0.5 * r,
        seconds=10.0 + r,
    )


def write_rounds(run_dir: Path, records: list[RoundRecord]) -> None:
    for record in records:
        append_round(run_dir, record)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_rounds(tmp_path, [round_record(r) for r in range(1, 6)])
    return tmp_path


def round_rows(table: str) -> list[str]:
    """The per-round rows: between the header's dashed rule and the first blank line."""
    lines = table.splitlines()
    return lines[2 : lines.index("")]


def test_plots_are_real_pngs_of_the_figure_size(run_dir: Path) -> None:
    written = write_plots(run_dir)
    assert [p.name for p in written] == [FEW_SHOT_PLOT, TRAIN_LOSS_PLOT, EPSILON_PLOT]
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        height, width, channels = matplotlib.image.imread(path).shape
        assert (height, width, channels) == (450, 700, 4)
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([METRICS, *(p.name for p in written)])


def test_plot_without_data_is_skipped(tmp_path: Path) -> None:
    write_rounds(tmp_path, [RoundRecord(1, train=TrainStep(64.0, 0.1, 0.01, query_loss=0.7)), RoundRecord(2)])
    assert [p.name for p in write_plots(tmp_path)] == [TRAIN_LOSS_PLOT, EPSILON_PLOT]  # no evaluation: no few-shot
    assert not (tmp_path / FEW_SHOT_PLOT).exists()


def test_rounds_without_a_step_or_an_evaluation_show_dashes_and_the_card_falls_back_to_training_hospitals(
    tmp_path: Path,
) -> None:
    write_rounds(tmp_path, [RoundRecord(1), RoundRecord(2, hospitals={"h0": {"balanced-accuracy": 0.6}})])
    table = write_report(tmp_path, {}, {})
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted([MODEL_CARD_MD, FEW_SHOT_PLOT, EPSILON_PLOT, METRICS, MODEL_CARD_JSON])
    assert [row.split()[1:] for row in round_rows(table)] == [["0", "0", "-", "-", "-", "0.00", "0.0"]] * 2
    assert "round 2: no held-out hospitals evaluated" in table
    card = json.loads((tmp_path / MODEL_CARD_JSON).read_text())
    assert card["final_metrics"] == {"balanced-accuracy": 0.6} and card["data"]["rounds_trained"] == 0
    assert card["privacy"]["epsilon"] == {"per_hospital": {}, "without_dp": [], "max": 0.0, "site_level": None}


def test_run_without_metrics_still_gets_a_model_card(tmp_path: Path) -> None:
    assert "no completed rounds" in write_report(tmp_path, {"maml.inner-steps": 5}, {"hospitals": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_CARD_MD, MODEL_CARD_JSON]


def test_model_card_has_epsilon_per_hospital_and_nothing_beyond_what_it_is_given(run_dir: Path) -> None:
    with (run_dir / METRICS).open("a") as f:  # anything else in the metrics stays out of the card
        f.write(json.dumps({**as_json(round_record(6)), "patient": "DOE^JANE"}) + "\n")
    config = {"model.arch": "conv4", "maml.inner-steps": 5, "maml.inner-lr": 0.01, "privacy.target-epsilon": 8.0}
    unit = "Privacy unit: one patient's scans at one hospital (example-level DP, per hospital)."
    data_summary = {"training-hospitals": 3, "heldout-hospitals": 2, "scans": {"train": 900, "test": 300}}
    final = {"balanced-accuracy": 0.655, "auc": 0.6}

    (run_dir / META_MODEL).write_bytes(b"")
    path = write_model_card(run_dir, config, {**data_summary, "privacy_unit": unit}, final)

    card = json.loads((run_dir / MODEL_CARD_JSON).read_text())
    one, two, three = TRAINING
    assert card == {
        "weights": [META_MODEL],
        "rounds": 6,
        "config": config,
        "data": {
            **data_summary,
            "rounds_trained": 6,
            # from the round records: rounds a hospital's gradient was used in, gradients it sent, its epsilon
            "hospitals": {
                two: {"rounds_trained": 6, "releases": 6, "epsilon": 10.0, "dp": True},
                three: {"rounds_trained": 3, "releases": 3, "epsilon": 9.5, "dp": True},
                "node-9999": {"rounds_trained": 0, "releases": 6, "epsilon": None, "dp": None},
                one: {"rounds_trained": 6, "releases": 6, "epsilon": 9.0, "dp": True},
            },
            "heldout_hospitals": HELDOUT,
        },
        "privacy": {
            "unit": unit,
            # the largest cumulative epsilon each hospital reported over the run, not only in the last round
            "epsilon": {
                "per_hospital": {one: 9.0, two: 10.0, three: 9.5},
                "without_dp": [],
                "max": 10.0,
                "site_level": 3.0,
            },
        },
        "final_metrics": final,
    }
    markdown = path.read_text()
    assert path.name == MODEL_CARD_MD
    for line in [
        f"| {one} | 9 |",
        f"| {two} | 10 |",
        f"| {three} | 9.5 |",
        f"| {one} | 6 | 6 | 9 | on |  |",
        f"| {three} | 3 | 3 | 9.5 | on |  |",
        "- rounds that trained the meta-model: 6",
        "- held-out hospitals (few-shot evaluation only, never trained): hospital-000, hospital-001",
        "- max epsilon over hospitals: 10",
        unit,
        f"- `{META_MODEL}`",
        "| `maml.inner-lr` | 0.01 |",
        "- training-hospitals: 3",
        "  - train: 900",
        "- balanced-accuracy: 0.655",
    ]:
        assert line in markdown.splitlines()
    assert "DOE^JANE" not in markdown + json.dumps(card)
    assert "reason" not in markdown


def test_summary_table_has_one_fixed_width_row_per_round_and_last_heldout_block(run_dir: Path) -> None:
    table = summary_table(run_dir)
    lines = table.splitlines()
    rows = round_rows(table)
    assert lines[0].split()[:3] == ["round", "participants", "rejected"]
    assert [row.split()[0] for row in rows] == ["1", "2", "3", "4", "5"]
    assert len({len(line) for line in [*lines[:2], *rows]}) == 1
    assert rows[-1].split() == ["5", "3", "1", "0.4500", "0.625", "0.600", "9.50", "15.0"]
    block = lines[len(rows) + 3 :]
    assert block[0] == "held-out hospitals, round 5:"
    assert block[1].split() == ["hospital", "accuracy", "balanced-accuracy", "auc"]
    assert [line.split() for line in block[3:]] == [
        ["hospital-000", "0.700", "0.650", "0.600"],
        ["hospital-001", "0.700", "0.600", "0.600"],
    ]


def test_report_final_metrics_are_heldout_mean_of_last_round(run_dir: Path) -> None:
    write_report(run_dir, {}, {})
    card = json.loads((run_dir / MODEL_CARD_JSON).read_text())
    assert card["final_metrics"] == round_record(5).heldout_mean


def test_a_hospital_without_dp_is_no_dp_with_infinite_epsilon_in_table_card_and_plot(tmp_path: Path) -> None:
    # what the strategy writes: a hospital that released without DP has epsilon null and dp false
    records = []
    for r in (1, 2):
        record = round_record(r)
        record.epsilon = {"st-olav": 1.5 * r, "h1 (node 5678)": None}
        record.dp = {"st-olav": True, "h1 (node 5678)": False}
        record.epsilon_max = None
        records.append(record)
    write_rounds(tmp_path, records)
    table = write_report(tmp_path, {}, {})
    assert [row.split()[6:8] for row in round_rows(table)] == [["no", "DP"], ["no", "DP"]]
    card = json.loads((tmp_path / MODEL_CARD_JSON).read_text())["privacy"]["epsilon"]
    assert card["per_hospital"] == {"st-olav": 3.0, "h1 (node 5678)": None}
    assert card["without_dp"] == ["h1 (node 5678)"] and card["max"] is None
    markdown = (tmp_path / MODEL_CARD_MD).read_text().splitlines()
    assert "| h1 (node 5678) | no DP (epsilon infinite) |" in markdown
    assert "| h1 (node 5678) | 2 | 2 | no DP (epsilon infinite) | off |  |" in markdown
    assert "- max epsilon over hospitals: no DP, infinite (1 of 2 hospitals without DP; 3 at the others)" in markdown
    assert (tmp_path / EPSILON_PLOT).read_bytes().startswith(PNG_SIGNATURE)


def test_a_run_where_no_hospital_ran_dp_still_plots_its_no_dp_marks(tmp_path: Path) -> None:
    write_rounds(tmp_path, [RoundRecord(1, epsilon={"node-1": None}, dp={"node-1": False}, epsilon_max=None)])
    assert [p.name for p in write_plots(tmp_path)] == [EPSILON_PLOT]


def test_a_failed_run_card_says_so_with_each_hospitals_refusal_and_lists_no_weights(tmp_path: Path) -> None:
    refusals = [
        Refusal("h0", "budget", "privacy budget exhausted: epsilon spent 7.997"),
        Refusal("h1", "policy", "refused by the hospital's privacy policy: dp=true"),
    ]
    write_rounds(tmp_path, [RoundRecord(1, eligible=2, sampled=2, refused=refusals)])
    reason = "no hospital can train:\n  h0 refused (budget): privacy budget exhausted: epsilon spent 7.997"
    write_report(tmp_path, {}, {}, RunOutcome("failed", reason, rounds=2, rounds_trained=0))
    card = json.loads((tmp_path / MODEL_CARD_JSON).read_text())
    assert card["outcome"] == {"state": "failed", "reason": reason} and card["weights"] == []
    assert card["data"]["hospitals"]["h0"]["refused"] == "budget: privacy budget exhausted: epsilon spent 7.997"
    markdown = (tmp_path / MODEL_CARD_MD).read_text().splitlines()
    assert "**Failed**: 0 of 1 recorded rounds trained the meta-model. The run stopped:" in markdown
    assert "  h0 refused (budget): privacy budget exhausted: epsilon spent 7.997" in markdown
    assert "| h0 | 0 | 0 | - | - | budget: privacy budget exhausted: epsilon spent 7.997 |" in markdown
    assert "- none: no round trained the meta-model" in markdown


def test_plots_have_chance_scratch_and_privacy_target_reference_lines(run_dir: Path) -> None:
    comparison = {h: {"scratch": {"balanced-accuracy": score}} for h, score in zip(HELDOUT, [0.6, 0.7])}
    (run_dir / HELDOUT_COMPARISON).write_text(json.dumps(comparison))
    config = {"model.n-way": 3, "privacy.enabled": True, "privacy.target-epsilon": 8.0}
    few_shot = few_shot_references(run_dir, config)
    assert [(label, round(value, 4)) for label, value, _ in few_shot] == [
        ("chance (1/3)", 0.3333),
        ("from scratch, held-out (after the run)", 0.65),
    ]
    assert [value for _, value, _ in epsilon_references(config)] == [8.0]
    assert epsilon_references({**config, "privacy.enabled": False}) == []
    written = write_plots(run_dir, config)
    assert [p.name for p in written] == [FEW_SHOT_PLOT, TRAIN_LOSS_PLOT, EPSILON_PLOT]


def test_the_train_loss_moving_average_is_a_trailing_mean() -> None:
    points = [(1, 4.0), (2, 2.0), (3, 0.0), (4, 2.0)]
    assert moving_average(points, 3) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 4 / 3)]
