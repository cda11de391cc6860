"""The round log: typed records, the JSON lines they are, and what a bad or cut-short line does."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from server.round_log import (
    Refusal,
    Rejection,
    RoundRecord,
    TrainStep,
    Worst,
    append_round,
    drop_rounds_after,
    privacy_so_far,
    read_round_log,
)
from shared.errors import UserError
from shared.run_folder import METRICS


def full_record(r: int) -> RoundRecord:
    return RoundRecord(
        round=r,
        eligible=3,
        sampled=3,
        participants=1,
        trained=["st-olav"],
        released=["h1", "st-olav"],
        rejected=[Rejection("h1", "gradient norm 9e+09 exceeds server.max-update-norm 1e+03")],
        refused=[Refusal("h2", "budget", "privacy budget exhausted")],
        bytes_down=300,
        bytes_up=100,
        train=TrainStep(episodes=16.0, update_norm=0.25, lr=0.001, query_loss=0.69),
        hospitals={"st-olav": {"accuracy": 0.6, "balanced-accuracy": 0.55}},
        worst_hospital=Worst("st-olav", 0.55),
        evaluation_refused=[Refusal("h2", "policy", "evaluation is not allowed")],
        heldout={"heldout/hospital-000": {"accuracy": 0.7, "balanced-accuracy": 0.65}},
        heldout_mean={"accuracy": 0.7, "balanced-accuracy": 0.65},
        heldout_worst=Worst("heldout/hospital-000", 0.65),
        epsilon={"st-olav": 1.25, "h1": None},
        dp={"st-olav": True, "h1": False},
        epsilon_max=None,
        site_epsilon=0.5,
        seconds=2.5,
    )


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]


def test_a_record_reads_back_equal_from_one_line_with_the_documented_keys(tmp_path: Path) -> None:
    append_round(tmp_path, full_record(1))
    assert read_round_log(tmp_path) == [full_record(1)]
    (line,) = lines(tmp_path)
    assert line["train"] == {"episodes": 16.0, "update-norm": 0.25, "lr": 0.001, "query-loss": 0.69}
    assert line["worst_hospital"] == {"hospital": "st-olav", "balanced-accuracy": 0.55}
    assert line["rejected"] == [{"hospital": "h1", "reason": full_record(1).rejected[0].reason}]
    assert line["epsilon"] == {"st-olav": 1.25, "h1": None} and line["epsilon_max"] is None


def test_a_round_without_a_step_or_an_evaluation_leaves_those_keys_out(tmp_path: Path) -> None:
    dp_only = RoundRecord(2, train=TrainStep(episodes=8.0, update_norm=0.1, lr=0.01))  # every reply ran DP: no loss
    append_round(tmp_path, RoundRecord(1))
    append_round(tmp_path, dp_only)
    first, second = lines(tmp_path)
    assert not {"train", "hospitals", "worst_hospital", "evaluation_refused"} & set(first)
    assert not {"heldout", "heldout_mean", "heldout_worst"} & set(first)
    assert "site_epsilon" in first and first["epsilon_max"] == 0.0
    assert "query-loss" not in second["train"]
    assert read_round_log(tmp_path) == [RoundRecord(1), dp_only]


def test_the_last_line_written_for_a_round_wins_and_keys_the_record_lacks_are_ignored(tmp_path: Path) -> None:
    for record in (RoundRecord(1), RoundRecord(2, seconds=1.0), RoundRecord(2, seconds=2.0)):
        append_round(tmp_path, record)
    with (tmp_path / METRICS).open("a") as f:
        f.write(json.dumps({**lines(tmp_path)[0], "round": 3, "from-a-newer-server": 1}) + "\n")
    assert read_round_log(tmp_path) == [RoundRecord(1), RoundRecord(2, seconds=2.0), RoundRecord(3)]


def test_a_last_line_cut_short_is_skipped_with_a_warning_and_dropped_when_the_run_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for r in (1, 2, 3):
        append_round(tmp_path, full_record(r))
    with (tmp_path / METRICS).open("a") as f:  # killed while writing round 4
        f.write('{"round": 4, "eligible": 3, "sam')
    with caplog.at_level(logging.WARNING, logger="server.round_log"):
        assert [r.round for r in read_round_log(tmp_path)] == [1, 2, 3]
    assert f"{tmp_path / METRICS} line 4 is incomplete" in caplog.text
    drop_rounds_after(tmp_path, 2)  # the checkpoint is round 2's: round 3 is trained again
    assert (tmp_path / METRICS).read_text().endswith("}\n")
    assert read_round_log(tmp_path) == [full_record(1), full_record(2)]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"round": 2, "eligi', "line 2 is not JSON"),
        ("[1, 2]", "line 2: the line must be a JSON object, not [1, 2]"),
        ('{"round": 2}', "line 2: 'eligible' is missing"),
        ("round-2", "line 2 is not JSON"),
    ],
)
def test_a_line_that_does_not_fit_is_one_line_naming_the_file_the_line_and_the_fix(
    tmp_path: Path, line: str, says: str
) -> None:
    append_round(tmp_path, RoundRecord(1))
    with (tmp_path / METRICS).open("a") as f:
        f.write(line + "\n")
    append_round(tmp_path, RoundRecord(3))
    with pytest.raises(UserError) as err:
        read_round_log(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / METRICS} {says}") and len(message.splitlines()) == 1
    assert message.endswith("restore the file or delete that line")


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"sampled": "3"}, "'sampled' must be a whole number, not \"3\""),
        ({"participants": True}, "'participants' must be a whole number, not true"),
        ({"train": {"episodes": 1.0, "lr": 0.1}}, "'train.update-norm' is missing"),
        ({"rejected": [{"hospital": "h1"}]}, "'rejected[0].reason' is missing"),
        ({"heldout": {"heldout/h0": {"auc": "high"}}}, "'heldout.heldout/h0.auc' must be a number, not \"high\""),
        ({"dp": {"h1": 1}}, "'dp.h1' must be true or false, not 1"),
        ({"epsilon": None}, "'epsilon' must be an object, not null"),
    ],
)
def test_a_value_of_the_wrong_type_names_where_it_is(tmp_path: Path, change: dict, says: str) -> None:
    append_round(tmp_path, full_record(1))
    (tmp_path / METRICS).write_text(json.dumps(lines(tmp_path)[0] | change) + "\n")
    with pytest.raises(UserError, match="^" + str(tmp_path / METRICS) + " line 1: ") as err:
        read_round_log(tmp_path)
    assert says in str(err.value)


def test_no_log_yet_is_no_rounds(tmp_path: Path) -> None:
    assert read_round_log(tmp_path) == []
    drop_rounds_after(tmp_path, 0)
    assert not (tmp_path / METRICS).exists()


def test_privacy_so_far_keeps_each_hospitals_last_epsilon_and_no_dp_for_good() -> None:
    records = [
        RoundRecord(1, epsilon={"st-olav": 1.0, "h1": None}, dp={"st-olav": True, "h1": False}, epsilon_max=None),
        RoundRecord(2, epsilon={"st-olav": 1.5, "h1": 0.5}, dp={"st-olav": True, "h1": True}, epsilon_max=None),
        RoundRecord(3, epsilon={"h2": 0.7}, dp={"h2": True}, epsilon_max=None),
    ]
    standing = privacy_so_far(records)
    assert standing.epsilon == {"st-olav": 1.5, "h1": None, "h2": 0.7}
    assert standing.dp == {"st-olav": True, "h1": False, "h2": True} and standing.without_dp == ["h1"]
