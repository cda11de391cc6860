"""Run outputs: plots, model card and terminal summary, all derived from ``RUN_DIR/metrics.jsonl``.

The strategy appends one JSON object per completed round. Every key except ``round`` is optional,
so every reader here treats a missing or non-numeric value as "no data" rather than an error.
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

from shared.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "meta-model.safetensors"
MODEL_CARD_FILE = "MODEL_CARD.md"
MODEL_CARD_JSON = "model-card.json"
HEADLINE_METRIC = "balanced-accuracy"
# Above this many hospitals the epsilon plot draws them unlabelled: a legend of hundreds helps nobody.
LABELLED_HOSPITALS = 8

Series = tuple[str, list[tuple[int, float]], dict[str, Any]]


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
        for hospital, value in _dict(record, "epsilon").items():
            if (number := _number(value)) is not None:
                out.setdefault(str(hospital), []).append((record["round"], number))
    return out


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
            _points(records, lambda r: _number(r.get("epsilon_max"))),
            {"color": "tab:red", "lw": 2.5},
        ),
        ("site level", _points(records, lambda r: _number(r.get("site_epsilon"))), {"color": "k", "ls": "--", "lw": 2}),
        *per_hospital,
    ]


def _png(series: list[Series], title: str, ylabel: str, ylim: tuple[float | None, float | None]) -> bytes | None:
    """The non-empty series drawn as a PNG; None when all are empty."""
    drawn = [(label, points, style) for label, points, style in series if points]
    if not drawn:
        return None
    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, points, style in drawn:
        rounds, values = zip(*points)
        ax.plot(rounds, values, marker="o", markersize=3, label=label or "_nolegend_", **style)
    ax.set(title=title, xlabel="round", ylabel=ylabel, ylim=ylim)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if any(label for label, _, _ in drawn):
        ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def write_plots(run_dir: Path) -> list[Path]:
    """Write few-shot.png, train-loss.png and epsilon.png; a plot with no data is not written."""
    records = read_metrics(run_dir)
    loss = [("query loss", _points(records, lambda r: _metric(r, "train", "query-loss")), {})]
    plots = {
        "few-shot.png": _png(_few_shot_series(records), "Few-shot balanced accuracy", "balanced accuracy", (0, 1)),
        "train-loss.png": _png(loss, "Meta-training query loss", "query loss", (None, None)),
        "epsilon.png": _png(_epsilon_series(records), "Privacy spent (cumulative)", "epsilon", (0, None)),
    }
    written = []
    for name, png in plots.items():
        if png is not None:
            _write_bytes(run_dir / name, png)
            written.append(run_dir / name)
    return written


def _epsilon_summary(records: list[dict]) -> dict[str, Any]:
    """Largest cumulative epsilon each hospital reported (privacy loss never goes down), the max, site level."""
    per_hospital = {h: max(v for _, v in points) for h, points in sorted(_hospital_epsilons(records).items())}
    maxima = [*per_hospital.values(), *(v for _, v in _points(records, lambda r: _number(r.get("epsilon_max"))))]
    site = _points(records, lambda r: _number(r.get("site_epsilon")))
    return {
        "per_hospital": per_hospital,
        "max": max(maxima, default=None),
        "site_level": site[-1][1] if site else None,
    }


def _model_card(run_dir: Path, config: dict, data_summary: dict, final_metrics: dict) -> dict[str, Any]:
    records = read_metrics(run_dir)
    return {
        "weights": [WEIGHTS_FILE],
        "rounds": records[-1]["round"] if records else 0,
        "config": dict(config),
        "data": {k: v for k, v in data_summary.items() if k != "privacy_unit"},
        "privacy": {"unit": data_summary.get("privacy_unit"), "epsilon": _epsilon_summary(records)},
        "final_metrics": dict(final_metrics),
    }


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


def _markdown(card: dict[str, Any]) -> str:
    privacy, epsilon = card["privacy"], card["privacy"]["epsilon"]
    config_rows = [f"| `{key}` | {_text(value)} |" for key, value in sorted(card["config"].items())]
    epsilon_rows = [f"| {hospital} | {_text(value)} |" for hospital, value in epsilon["per_hospital"].items()]
    lines = [
        "# Model card: fedmeta meta-model",
        "",
        f"Meta-learned initialisation (MAML) trained by federated learning over {card['rounds']} rounds.",
        "",
        "## Weights",
        "",
        *(f"- `{name}`" for name in card["weights"]),
        "",
        "## Configuration",
        "",
        "| key | value |",
        "| --- | --- |",
        *config_rows,
        "",
        "## Data (counts only)",
        "",
        *(_bullets(card["data"]) or ["- none given"]),
        "",
        "## Privacy",
        "",
        *([privacy["unit"], ""] if privacy["unit"] else []),
        f"- max epsilon over hospitals: {_text(epsilon['max'])}",
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


def write_model_card(run_dir: Path, config: dict, data_summary: dict, final_metrics: dict) -> Path:
    """Write MODEL_CARD.md and model-card.json (same content) from exactly what is given plus the run's epsilons.

    Nothing is read from the data: the caller decides what the card says about it (counts only, no PHI).
    """
    card = _model_card(run_dir, config, data_summary, final_metrics)
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
    ("epsilon max", lambda r: _cell(r.get("epsilon_max"), ".2f")),
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


def write_report(run_dir: Path, config: dict, data_summary: dict) -> str:
    """Plots and model card into ``run_dir``; returns the summary table for the terminal."""
    records = read_metrics(run_dir)
    last = records[-1] if records else {}
    final_metrics = _dict(last, "heldout_mean") or _mean_metrics(_dict(last, "hospitals"))
    write_plots(run_dir)
    write_model_card(run_dir, config, data_summary, final_metrics)
    return summary_table(run_dir)
