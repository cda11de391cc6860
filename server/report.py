"""Run outputs: plots, model card and terminal summary, all derived from the run's round records
(``RUN_DIR/metrics.jsonl``, read by :func:`server.round_log.read_round_log`).

A hospital that released without DP (its record's ``dp`` false, its epsilon None) is shown as "no DP"
(epsilon infinite), never as a number. Hospitals are named as the records name them (their public names).
Plots carry reference lines from the run's config and ``heldout-comparison.json``: chance, a model trained
from scratch, the run's privacy target.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.outcome import RunOutcome
from server.round_log import HEADLINE_METRIC, Metrics, RoundRecord, Worst, mean_metrics, read_round_log, rounds_trained
from shared.atomic import atomic_write, atomic_write_json
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

# Above this many hospitals the epsilon plot draws them unlabelled: a legend of hundreds helps nobody.
LABELLED_HOSPITALS = 8
NO_DP = "no DP"
# A series with this style key is drawn along the top edge of the plot: its values are infinite.
TOP_EDGE = "top_edge"

# The train-loss plot's moving average spans this many rounds at most, and is drawn from this many points on.
SMOOTHING_ROUNDS = 10
SMOOTHED_FROM = 4

Series = tuple[str, list[tuple[int, float]], dict[str, Any]]
# A horizontal reference line: label, value, style.
Reference = tuple[str, float, dict[str, Any]]


def _number(value: Any) -> float | None:
    """A number from the run's flat config or ``heldout-comparison.json``, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _headline(metrics: Metrics) -> float | None:
    return metrics.get(HEADLINE_METRIC)


def _worst(worst: Worst | None) -> float | None:
    return None if worst is None else worst.balanced_accuracy


def _points(records: list[RoundRecord], value: Callable[[RoundRecord], float | None]) -> list[tuple[int, float]]:
    return [(r.round, v) for r in records if (v := value(r)) is not None]


def _hospital_epsilons(records: list[RoundRecord]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        without = record.without_dp
        for hospital, value in record.epsilon.items():
            if hospital not in without and value is not None:
                out.setdefault(hospital, []).append((record.round, value))
    return out


def _epsilon_max_cell(record: RoundRecord) -> str:
    return NO_DP if record.epsilon_max is None else _cell(record.epsilon_max, ".2f")


def _few_shot_series(records: list[RoundRecord]) -> list[Series]:
    return [
        (
            "training hospitals, mean",
            _points(records, lambda r: _headline(mean_metrics(r.hospitals))),
            {"color": "tab:blue"},
        ),
        (
            "training hospitals, worst",
            _points(records, lambda r: _worst(r.worst_hospital)),
            {"color": "tab:blue", "ls": "--"},
        ),
        ("held-out hospitals, mean", _points(records, lambda r: _headline(r.heldout_mean)), {"color": "tab:orange"}),
        (
            "held-out hospitals, worst",
            _points(records, lambda r: _worst(r.heldout_worst)),
            {"color": "tab:orange", "ls": "--"},
        ),
    ]


def _epsilon_series(records: list[RoundRecord]) -> list[Series]:
    without, so_far = [], set()
    for record in records:
        so_far.update(record.without_dp)
        if so_far:
            without.append((record.round, len(so_far)))
    hospitals = sorted(_hospital_epsilons(records).items())
    labelled = len(hospitals) <= LABELLED_HOSPITALS
    # a hospital's epsilon only moves in rounds it takes part in: steps, not slopes, between them
    thin = {"linewidth": 1, "alpha": 0.6, "drawstyle": "steps-post"} | ({} if labelled else {"color": "tab:gray"})
    per_hospital: list[Series] = [
        (name if labelled else f"each hospital ({len(hospitals)})" if i == 0 else "", points, thin)
        for i, (name, points) in enumerate(hospitals)
    ]
    return [
        (
            "max over hospitals",
            _points(records, lambda r: r.epsilon_max),
            {"color": "tab:red", "lw": 2.5},
        ),
        ("site level", _points(records, lambda r: r.site_epsilon), {"color": "k", "ls": "--", "lw": 2}),
        *per_hospital,
        (
            f"{NO_DP} at a hospital (epsilon infinite)",
            without,
            {TOP_EDGE: True, "color": "tab:red", "marker": "^", "markersize": 8, "ls": "none"},
        ),
    ]


def _png(
    series: list[Series],
    title: str,
    ylabel: str,
    ylim: tuple[float | None, float | None],
    references: Iterable[Reference] = (),
) -> bytes | None:
    """The non-empty series, and the reference lines, drawn as a PNG; None when all series are empty."""
    drawn = [(label, points, style) for label, points, style in series if points]
    if not drawn:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points, style in drawn:
        rounds, values = zip(*points)
        if style.get(TOP_EDGE):  # infinite values: at the top of the axes, whatever the y range
            rest = {k: v for k, v in style.items() if k != TOP_EDGE}
            ax.plot(
                rounds, [0.97] * len(rounds), transform=ax.get_xaxis_transform(), clip_on=False, label=label, **rest
            )
            continue
        ax.plot(rounds, values, **({"marker": "o", "markersize": 3} | style), label=label or "_nolegend_")
    for label, value, style in references:
        ax.axhline(value, label=label, **({"color": "tab:gray", "ls": ":", "lw": 1.5} | style))
    ax.set(title=title, xlabel="round", ylabel=ylabel, ylim=ylim)
    if ylim[1] is None and references:  # a reference line at the top edge would hide under the frame
        ax.set_ylim(top=max(ax.get_ylim()[1], 1.1 * max(value for _, value, _ in references)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(label for label, _, _ in drawn) or references:
        ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def moving_average(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """Each point's value replaced by the mean of it and the ``window - 1`` points before it."""
    values = [v for _, v in points]
    averaged = []
    for i, (round_, _) in enumerate(points):
        span = values[max(0, i - window + 1) : i + 1]
        averaged.append((round_, sum(span) / len(span)))
    return averaged


def _loss_series(records: list[RoundRecord]) -> list[Series]:
    raw = _points(records, lambda r: r.query_loss)
    if len(raw) < SMOOTHED_FROM:
        return [("query loss", raw, {})]
    window = min(SMOOTHING_ROUNDS, max(3, len(raw) // 5))
    return [
        ("query loss, each round", raw, {"color": "tab:blue", "alpha": 0.35, "lw": 1, "markersize": 2}),
        (
            f"moving average over {window} rounds",
            moving_average(raw, window),
            {"color": "tab:blue", "lw": 2.5, "marker": ""},
        ),
    ]


def _scratch_score(run_dir: Path) -> float | None:
    """Mean held-out balanced accuracy of a model trained from scratch on the same shots, if the run measured it."""
    try:
        comparison = json.loads((run_dir / HELDOUT_COMPARISON).read_text())
    except (OSError, ValueError):
        return None
    scores = [
        v
        for h in (comparison.values() if isinstance(comparison, dict) else [])
        if isinstance(h, dict)
        and isinstance(scratch := h.get("scratch"), dict)
        and (v := _number(scratch.get(HEADLINE_METRIC))) is not None
    ]
    return sum(scores) / len(scores) if scores else None


def few_shot_references(run_dir: Path, config: dict) -> list[Reference]:
    references: list[Reference] = []
    n_way = _number(config.get("model.n-way"))
    if n_way is not None and n_way >= 2:
        references.append((f"chance (1/{n_way:g})", 1 / n_way, {"color": "k", "ls": ":"}))
    if (scratch := _scratch_score(run_dir)) is not None:
        references.append(("from scratch, held-out (after the run)", scratch, {"color": "tab:green", "ls": "-."}))
    return references


def epsilon_references(config: dict) -> list[Reference]:
    target = _number(config.get("privacy.target-epsilon"))
    if target is None or config.get("privacy.enabled") is False:
        return []
    return [(f"run's target (privacy.target-epsilon {target:g})", target, {"color": "tab:purple", "ls": "-."})]


def write_plots(run_dir: Path, config: dict | None = None) -> list[Path]:
    """Write the few-shot, train-loss and epsilon plots; a plot with no data is not written.

    ``config`` (the run's flat settings) gives the reference lines: chance from model.n-way, the privacy target."""
    records = read_round_log(run_dir)
    config = config or {}
    plots = {
        FEW_SHOT_PLOT: _png(
            _few_shot_series(records),
            "Few-shot balanced accuracy",
            "balanced accuracy",
            (0, 1),
            few_shot_references(run_dir, config),
        ),
        TRAIN_LOSS_PLOT: _png(_loss_series(records), "Meta-training query loss", "query loss", (None, None)),
        EPSILON_PLOT: _png(
            _epsilon_series(records), "Privacy spent (cumulative)", "epsilon", (0, None), epsilon_references(config)
        ),
    }
    written = []
    for name, png in plots.items():
        if png is not None:
            _write_bytes(run_dir / name, png)
            written.append(run_dir / name)
    return written


def _epsilon_summary(records: list[RoundRecord]) -> dict[str, Any]:
    """Largest cumulative epsilon each hospital reported (privacy loss never goes down), the max, site level.

    A hospital that released without DP in any round has epsilon null (infinite) and is listed in
    ``without_dp``; then the max is null too."""
    without = sorted({hospital for r in records for hospital in r.without_dp})
    epsilons = _hospital_epsilons(records)
    per_hospital = {h: None if h in without else max(v for _, v in epsilons[h]) for h in sorted({*epsilons, *without})}
    maxima = [v for v in per_hospital.values() if v is not None]
    maxima += [r.epsilon_max for r in records if r.epsilon_max is not None]
    site = _points(records, lambda r: r.site_epsilon)
    return {
        "per_hospital": per_hospital,
        "without_dp": without,
        "max": None if without else max(maxima, default=None),
        "site_level": site[-1][1] if site else None,
    }


def _epsilon_text(value: float | None) -> str:
    return f"{NO_DP} (epsilon infinite)" if value is None else _text(value)


def _max_epsilon_line(epsilon: dict[str, Any]) -> str:
    without = epsilon["without_dp"]
    if not without:
        return f"- max epsilon over hospitals: {_text(epsilon['max'])}"
    finite = [v for v in epsilon["per_hospital"].values() if v is not None]
    others = f"; {_text(max(finite))} at the others" if finite else ""
    counted = f"{len(without)} of {len(epsilon['per_hospital'])} hospitals without DP"
    return f"- max epsilon over hospitals: {NO_DP}, infinite ({counted}{others})"


def _hospital_summary(records: list[RoundRecord], epsilon: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per training hospital, from the round records only: rounds its gradient was used in, gradients it
    released to the run, its largest epsilon, whether it ran DP, and its refusal if it refused."""
    hospitals: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return hospitals.setdefault(name, {"rounds_trained": 0, "releases": 0, "epsilon": None, "dp": None})

    for record in records:
        for name in record.trained:
            entry(name)["rounds_trained"] += 1
        for name in record.released:
            entry(name)["releases"] += 1
        for name, dp in record.dp.items():
            entry(name)["dp"] = dp and entry(name)["dp"] is not False
        for refusal in record.refused:
            entry(refusal.hospital)["refused"] = f"{refusal.kind}: {refusal.reason}"
    for name, value in epsilon["per_hospital"].items():
        entry(name)["epsilon"] = value
    return dict(sorted(hospitals.items()))


def _model_card(
    run_dir: Path, config: dict, data_summary: dict, final_metrics: dict, outcome: RunOutcome | None
) -> dict[str, Any]:
    records = read_round_log(run_dir)
    epsilon = _epsilon_summary(records)
    heldout = sorted({h for r in records for h in r.heldout})
    card = {
        "weights": [META_MODEL] if (run_dir / META_MODEL).exists() else [],
        "rounds": records[-1].round if records else 0,
        "config": dict(config),
        "data": {
            **{k: v for k, v in data_summary.items() if k != "privacy_unit"},
            "rounds_trained": rounds_trained(records),
            "hospitals": _hospital_summary(records, epsilon),
            "heldout_hospitals": heldout,
        },
        "privacy": {"unit": data_summary.get("privacy_unit"), "epsilon": epsilon},
        "final_metrics": dict(final_metrics),
    }
    if outcome is not None:
        card["outcome"] = {"state": outcome.state, "reason": outcome.reason}
    return card


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _bullets(mapping: dict, indent: str = "") -> list[str]:
    lines = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            lines += [f"{indent}- {key}:", *_bullets(value, indent + "  ")]
        else:
            lines.append(f"{indent}- {key}: {_text(value)}")
    return lines


def _dp_text(dp: bool | None) -> str:
    return {True: "on", False: "off", None: "-"}[dp]


def _hospital_epsilon_cell(hospital: dict[str, Any]) -> str:
    if hospital["dp"] is False:
        return _epsilon_text(None)
    return _text(hospital["epsilon"])


def _outcome_lines(card: dict[str, Any]) -> list[str]:
    outcome = card.get("outcome")
    if outcome is None:
        return []
    trained = f"{card['data']['rounds_trained']} of {card['rounds']} recorded rounds trained the meta-model."
    if outcome["state"] != "failed":
        return ["## Outcome", "", f"Completed: {trained}", ""]
    reason = outcome["reason"].splitlines() or ["no reason recorded"]
    return ["## Outcome", "", f"**Failed**: {trained} The run stopped:", "", "```", *reason, "```", ""]


def _data_lines(data: dict[str, Any]) -> list[str]:
    given = {k: v for k, v in data.items() if k not in ("rounds_trained", "hospitals", "heldout_hospitals")}
    rows = [
        f"| {name} | {h['rounds_trained']} | {h['releases']} | {_hospital_epsilon_cell(h)} | {_dp_text(h['dp'])} "
        f"| {h.get('refused', '')} |"
        for name, h in data["hospitals"].items()
    ]
    heldout = ", ".join(data["heldout_hospitals"]) or "none"
    lines = [
        *_bullets(given),
        f"- rounds that trained the meta-model: {data['rounds_trained']}",
        f"- held-out hospitals (few-shot evaluation only, never trained): {heldout}",
        "",
    ]
    if not rows:
        return [*lines, "No training hospital replied."]
    return [
        *lines,
        "Training hospitals, by the name each one chose. Rounds trained: rounds its gradient was used in;",
        "releases: gradients it sent to this run (a gradient rejected by the server was still released).",
        "",
        "| hospital | rounds trained | releases | epsilon | DP | refused |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


def _markdown(card: dict[str, Any]) -> str:
    privacy, epsilon = card["privacy"], card["privacy"]["epsilon"]
    config_rows = [f"| `{key}` | {_text(value)} |" for key, value in sorted(card["config"].items())]
    epsilon_rows = [f"| {hospital} | {_epsilon_text(value)} |" for hospital, value in epsilon["per_hospital"].items()]
    lines = [
        "# Model card: fedmeta meta-model",
        "",
        f"Meta-learned initialisation (MAML) by federated learning: {card['rounds']} rounds recorded.",
        "",
        *_outcome_lines(card),
        "## Weights",
        "",
        *([f"- `{name}`" for name in card["weights"]] or ["- none: no round trained the meta-model"]),
        "",
        "## Configuration",
        "",
        "| key | value |",
        "| --- | --- |",
        *config_rows,
        "",
        "## Data (no patient data: what the round records say)",
        "",
        *_data_lines(card["data"]),
        "",
        "## Privacy",
        "",
        *([privacy["unit"], ""] if privacy["unit"] else []),
        _max_epsilon_line(epsilon),
        *([f"- site-level epsilon: {_text(epsilon['site_level'])}"] if epsilon["site_level"] is not None else []),
        "",
        "| hospital | epsilon |",
        "| --- | --- |",
        *epsilon_rows,
        "",
        "## Final few-shot metrics",
        "",
        *(_bullets(card["final_metrics"]) or ["- none recorded"]),
    ]
    return "\n".join(lines) + "\n"


def write_model_card(
    run_dir: Path, config: dict, data_summary: dict, final_metrics: dict, outcome: RunOutcome | None = None
) -> Path:
    """Write the model card as Markdown and as JSON (same content) from what is given plus what the round records
    say per hospital (participation, epsilon, DP, refusals).

    Nothing is read from the data: the caller decides what else the card says about it (counts only, no PHI).
    """
    card = _model_card(run_dir, config, data_summary, final_metrics, outcome)
    path = run_dir / MODEL_CARD_MD
    _write_bytes(path, _markdown(card).encode())
    atomic_write_json(run_dir / MODEL_CARD_JSON, card)
    return path


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    body = list(rows)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]
    first, *rest = widths

    def line(cells: list[str]) -> str:
        head, *tail = cells
        return "  ".join([head.ljust(first), *(c.rjust(w) for c, w in zip(tail, rest))])

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in body)]


ROUND_COLUMNS: list[tuple[str, Callable[[RoundRecord], str]]] = [
    ("round", lambda r: str(r.round)),
    ("participants", lambda r: str(r.participants)),
    ("rejected", lambda r: str(len(r.rejected))),
    ("train loss", lambda r: _cell(r.query_loss, ".4f")),
    ("held-out bal-acc mean", lambda r: _cell(_headline(r.heldout_mean), ".3f")),
    ("worst", lambda r: _cell(_worst(r.heldout_worst), ".3f")),
    ("epsilon max", _epsilon_max_cell),
    ("seconds", lambda r: f"{r.seconds:.1f}"),
]


def summary_table(run_dir: Path) -> str:
    """One fixed-width row per round, then the last round's per-held-out-hospital metrics."""
    records = read_round_log(run_dir)
    if not records:
        return f"no completed rounds in {run_dir / METRICS}"
    lines = _table([h for h, _ in ROUND_COLUMNS], ([cell(r) for _, cell in ROUND_COLUMNS] for r in records))
    last = records[-1]
    lines.append("")
    if not last.heldout:
        return "\n".join([*lines, f"round {last.round}: no held-out hospitals evaluated"])
    metrics = list(dict.fromkeys(name for m in last.heldout.values() for name in m))
    heldout = sorted(last.heldout.items())
    rows = ([hospital, *(_cell(m.get(name), ".3f") for name in metrics)] for hospital, m in heldout)
    return "\n".join([*lines, f"held-out hospitals, round {last.round}:", *_table(["hospital", *metrics], rows)])


def write_report(run_dir: Path, config: dict, data_summary: dict, outcome: RunOutcome | None = None) -> str:
    """Plots and model card into ``run_dir``; returns the summary table for the terminal."""
    records = read_round_log(run_dir)
    final_metrics = (records[-1].heldout_mean or mean_metrics(records[-1].hospitals)) if records else {}
    write_plots(run_dir, config)
    write_model_card(run_dir, config, data_summary, final_metrics, outcome)
    return summary_table(run_dir)
