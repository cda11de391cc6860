"""Run outputs: plots, model card and terminal summary, all derived from ``RUN_DIR/metrics.jsonl``.

The strategy appends one JSON object per completed round. Every key except ``round`` is optional,
so every reader here treats a missing or non-numeric value as "no data" rather than an error.
A hospital that released without DP has ``"dp": {hospital: false}`` and a null epsilon (JSON has no
infinity): it is shown as "no DP" (epsilon infinite), never as a number. Hospitals are named as the
records name them (their public names). Plots carry reference lines from the run's config and
``heldout-comparison.json``: chance, a model trained from scratch, the run's privacy target.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.outcome import RunOutcome, rounds_trained
from shared.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "meta-model.safetensors"
MODEL_CARD_FILE = "MODEL_CARD.md"
MODEL_CARD_JSON = "model-card.json"
COMPARISON_FILE = "heldout-comparison.json"
HEADLINE_METRIC = "balanced-accuracy"
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


def read_metrics(run_dir: Path) -> list[dict]:
    """Round records sorted by round; the last record written for a round wins (a resumed run re-runs rounds).

    Lines that are not a JSON object with a ``round`` are skipped: a torn last line is what a killed
    writer leaves behind, and is skipped silently; anywhere else it is logged.
    """
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    by_round: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["round"] = int(record["round"])
        except (ValueError, TypeError, KeyError, OverflowError):
            if number < len(lines):
                log.warning("%s line %d is not a round record; skipped", path, number)
            continue
        by_round[record["round"]] = record
    return [by_round[r] for r in sorted(by_round)]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _dict(record: dict, key: str) -> dict:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _metric(record: dict, key: str, metric: str) -> float | None:
    return _number(_dict(record, key).get(metric))


def _mean_metrics(per_hospital: dict) -> dict[str, float]:
    """Unweighted mean over hospitals of each metric, each hospital counting once."""
    values: dict[str, list[float]] = {}
    for metrics in per_hospital.values():
        for name, value in (metrics if isinstance(metrics, dict) else {}).items():
            if (number := _number(value)) is not None:
                values.setdefault(name, []).append(number)
    return {name: sum(v) / len(v) for name, v in values.items()}


def _training_mean(record: dict) -> float | None:
    return _mean_metrics(_dict(record, "hospitals")).get(HEADLINE_METRIC)


def _points(records: list[dict], value: Callable[[dict], float | None]) -> list[tuple[int, float]]:
    return [(r["round"], v) for r in records if (v := value(r)) is not None]


def _hospital_epsilons(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        without = _without_dp(record)
        for hospital, value in _dict(record, "epsilon").items():
            if str(hospital) not in without and (number := _number(value)) is not None:
                out.setdefault(str(hospital), []).append((record["round"], number))
    return out


def _without_dp(record: dict) -> set[str]:
    """The hospitals the record says released without DP (epsilon infinite)."""
    return {str(hospital) for hospital, dp in _dict(record, "dp").items() if dp is False}


def _epsilon_max_cell(record: dict) -> str:
    return NO_DP if _without_dp(record) else _cell(record.get("epsilon_max"), ".2f")


def _few_shot_series(records: list[dict]) -> list[Series]:
    def summary(key: str) -> Callable[[dict], float | None]:
        return lambda r: _metric(r, key, HEADLINE_METRIC)

    return [
        ("training hospitals, mean", _points(records, _training_mean), {"color": "tab:blue"}),
        ("training hospitals, worst", _points(records, summary("worst_hospital")), {"color": "tab:blue", "ls": "--"}),
        ("held-out hospitals, mean", _points(records, summary("heldout_mean")), {"color": "tab:orange"}),
        ("held-out hospitals, worst", _points(records, summary("heldout_worst")), {"color": "tab:orange", "ls": "--"}),
    ]


def _epsilon_series(records: list[dict]) -> list[Series]:
    without = [(r["round"], len(w)) for r in records if (w := _without_dp(r))]
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
            _points(records, lambda r: None if _without_dp(r) else _number(r.get("epsilon_max"))),
            {"color": "tab:red", "lw": 2.5},
        ),
        ("site level", _points(records, lambda r: _number(r.get("site_epsilon"))), {"color": "k", "ls": "--", "lw": 2}),
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


def _loss_series(records: list[dict]) -> list[Series]:
    raw = _points(records, lambda r: _metric(r, "train", "query-loss"))
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
        comparison = json.loads((run_dir / COMPARISON_FILE).read_text())
    except (OSError, ValueError):
        return None
    scores = [
        v
        for h in (comparison.values() if isinstance(comparison, dict) else [])
        if isinstance(h, dict) and (v := _metric(h, "scratch", HEADLINE_METRIC)) is not None
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
    """Write few-shot.png, train-loss.png and epsilon.png; a plot with no data is not written.

    ``config`` (the run's flat settings) gives the reference lines: chance from model.n-way, the privacy target."""
    records = read_metrics(run_dir)
    config = config or {}
    plots = {
        "few-shot.png": _png(
            _few_shot_series(records),
            "Few-shot balanced accuracy",
            "balanced accuracy",
            (0, 1),
            few_shot_references(run_dir, config),
        ),
        "train-loss.png": _png(_loss_series(records), "Meta-training query loss", "query loss", (None, None)),
        "epsilon.png": _png(
            _epsilon_series(records), "Privacy spent (cumulative)", "epsilon", (0, None), epsilon_references(config)
        ),
    }
    written = []
    for name, png in plots.items():
        if png is not None:
            _write_bytes(run_dir / name, png)
            written.append(run_dir / name)
    return written


def _epsilon_summary(records: list[dict]) -> dict[str, Any]:
    """Largest cumulative epsilon each hospital reported (privacy loss never goes down), the max, site level.

    A hospital that released without DP in any round has epsilon null (infinite) and is listed in
    ``without_dp``; then the max is null too."""
    without = sorted(set().union(*(_without_dp(r) for r in records)))
    epsilons = _hospital_epsilons(records)
    per_hospital = {h: None if h in without else max(v for _, v in epsilons[h]) for h in sorted({*epsilons, *without})}
    maxima = [v for v in per_hospital.values() if v is not None]
    maxima += [v for r in records if not _without_dp(r) and (v := _number(r.get("epsilon_max"))) is not None]
    site = _points(records, lambda r: _number(r.get("site_epsilon")))
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


def _labels(record: dict, key: str) -> list[str]:
    value = record.get(key)
    return [str(v) for v in value] if isinstance(value, list) else []


def _hospital_summary(records: list[dict], epsilon: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per training hospital, from the round records only: rounds its gradient was used in, gradients it
    released to the run, its largest epsilon, whether it ran DP, and its refusal if it refused."""
    hospitals: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return hospitals.setdefault(name, {"rounds_trained": 0, "releases": 0, "epsilon": None, "dp": None})

    for record in records:
        for name in _labels(record, "trained"):
            entry(name)["rounds_trained"] += 1
        for name in _labels(record, "released"):
            entry(name)["releases"] += 1
        for name, dp in _dict(record, "dp").items():
            if isinstance(dp, bool):
                entry(str(name))["dp"] = dp and entry(str(name))["dp"] is not False
        for refusal in record.get("refused") if isinstance(record.get("refused"), list) else []:
            if isinstance(refusal, dict) and "hospital" in refusal:
                entry(str(refusal["hospital"]))["refused"] = f"{refusal.get('kind', '?')}: {refusal.get('reason', '')}"
    for name, value in epsilon["per_hospital"].items():
        entry(name)["epsilon"] = value
    return dict(sorted(hospitals.items()))


def _model_card(
    run_dir: Path, config: dict, data_summary: dict, final_metrics: dict, outcome: RunOutcome | None
) -> dict[str, Any]:
    records = read_metrics(run_dir)
    epsilon = _epsilon_summary(records)
    heldout = sorted({str(h) for r in records for h in _dict(r, "heldout")})
    card = {
        "weights": [WEIGHTS_FILE] if (run_dir / WEIGHTS_FILE).exists() else [],
        "rounds": records[-1]["round"] if records else 0,
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
    """Write MODEL_CARD.md and model-card.json (same content) from what is given plus what the round records
    say per hospital (participation, epsilon, DP, refusals).

    Nothing is read from the data: the caller decides what else the card says about it (counts only, no PHI).
    """
    card = _model_card(run_dir, config, data_summary, final_metrics, outcome)
    path = run_dir / MODEL_CARD_FILE
    _write_bytes(path, _markdown(card).encode())
    atomic_write_json(run_dir / MODEL_CARD_JSON, card)
    return path


def _cell(value: Any, spec: str) -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def _table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    body = list(rows)
    widths = [max(len(cell) for cell in column) for column in zip(headers, *body)]
    first, *rest = widths

    def line(cells: list[str]) -> str:
        head, *tail = cells
        return "  ".join([head.ljust(first), *(c.rjust(w) for c, w in zip(tail, rest))])

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in body)]


ROUND_COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("round", lambda r: str(r["round"])),
    ("participants", lambda r: _cell(r.get("participants"), ".0f")),
    ("rejected", lambda r: str(len(r["rejected"])) if isinstance(r.get("rejected"), list) else "-"),
    ("train loss", lambda r: _cell(_metric(r, "train", "query-loss"), ".4f")),
    ("held-out bal-acc mean", lambda r: _cell(_metric(r, "heldout_mean", HEADLINE_METRIC), ".3f")),
    ("worst", lambda r: _cell(_metric(r, "heldout_worst", HEADLINE_METRIC), ".3f")),
    ("epsilon max", _epsilon_max_cell),
    ("seconds", lambda r: _cell(r.get("seconds"), ".1f")),
]


def summary_table(run_dir: Path) -> str:
    """One fixed-width row per round, then the last round's per-held-out-hospital metrics."""
    records = read_metrics(run_dir)
    if not records:
        return f"no completed rounds in {run_dir / METRICS_FILE}"
    lines = _table([h for h, _ in ROUND_COLUMNS], ([cell(r) for _, cell in ROUND_COLUMNS] for r in records))
    last = records[-1]
    heldout = {h: m for h, m in _dict(last, "heldout").items() if isinstance(m, dict)}
    lines.append("")
    if not heldout:
        return "\n".join([*lines, f"round {last['round']}: no held-out hospitals evaluated"])
    metrics = list(dict.fromkeys(name for m in heldout.values() for name in m))
    rows = ([hospital, *(_cell(m.get(name), ".3f") for name in metrics)] for hospital, m in sorted(heldout.items()))
    return "\n".join([*lines, f"held-out hospitals, round {last['round']}:", *_table(["hospital", *metrics], rows)])


def write_report(run_dir: Path, config: dict, data_summary: dict, outcome: RunOutcome | None = None) -> str:
    """Plots and model card into ``run_dir``; returns the summary table for the terminal."""
    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    final_metrics = _dict(last, "heldout_mean") or _mean_metrics(_dict(last, "hospitals"))
    write_plots(run_dir, config)
    write_model_card(run_dir, config, data_summary, final_metrics, outcome)
    return summary_table(run_dir)
