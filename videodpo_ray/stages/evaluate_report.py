"""The evaluate stage's `index.html`: one self-contained page (plots and GIFs beside it, matplotlib, no scripts).

Sections: the headline (win rate, OmniScore gain), the before/after table per dimension with 95% intervals, the
training curves of the tuned run, the paper's four analysis panels for the data the run trained on ((a) max-min
OmniScore gap against N, (b) OmniScore histogram, (c) pair score-gap histogram, (d) dimension correlations), and a
gallery of before/after GIFs for the same prompt and seed with the prompt and both OmniScores under them. A gallery
file's name is its prompt's position and a sanitised prompt id (`gallery_file`); every value the page shows is
escaped; a value the summary could not compute (None) reads "n/a".
"""

from __future__ import annotations

import html
import io
import math
import re
import statistics
from typing import Any, Sequence

import numpy as np

from videodpo_ray import shards, storage
from videodpo_ray.dimensions import DIMENSIONS

CURVES = (("loss", "DPO loss"), ("implicit_accuracy", "implicit accuracy"), ("reward_margin", "reward margin"),
          ("mean_weight", "mean pair weight"))
STYLE = """body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#eee}td:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top;width:15em}figcaption{font-size:.85em}
img.plot{max-width:32em}.gain{color:#070}.loss{color:#a00}"""
GALLERY_ID_CHARS = 40  # of the sanitised prompt id in a gallery file name


def _png(figure: Any) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _figure(columns: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(4.2 * columns, 3.2))


def curves_png(scalars: dict[str, dict[int, float]]) -> bytes | None:
    """The training curves, one panel per metric logged."""
    present = [(key, title) for key, title in CURVES if scalars.get(key)]
    if not present:
        return None
    figure, axes = _figure(len(present))
    for axis, (key, title) in zip(np.atleast_1d(axes), present):
        steps = sorted(scalars[key])
        axis.plot(steps, [scalars[key][s] for s in steps], marker=".")
        axis.set_title(title)
        axis.set_xlabel("optimizer step")
    return _png(figure)


def analysis_png(data: str) -> bytes | None:
    """The paper's four panels for the generated training data under `data` (scores and pairs shards)."""
    scores = [row for info in shards.list_shards(data, "scores") for row in shards.read_shard(info).to_pylist()]
    scored = [row for row in scores if row["omniscore"] is not None and math.isfinite(row["omniscore"])]
    if not scored:
        return None
    by_prompt: dict[str, list[float]] = {}
    for row in scored:
        by_prompt.setdefault(row["prompt_id"], []).append(row["omniscore"])
    gaps = [row["win_score"] - row["lose_score"] for info in shards.list_shards(data, "pairs")
            for row in shards.read_shard(info).select(["win_score", "lose_score"]).to_pylist()]
    figure, axes = _figure(4)
    largest = max(len(values) for values in by_prompt.values())
    n_values = list(range(2, largest + 1))
    axes[0].plot(n_values, [statistics.fmean(max(v[:n]) - min(v[:n]) for v in by_prompt.values() if len(v) >= n)
                            for n in n_values], marker="o")
    axes[0].set(title="(a) max-min OmniScore gap", xlabel="N samples per prompt")
    axes[1].hist([row["omniscore"] for row in scored], bins=20)
    axes[1].set(title="(b) OmniScore", xlabel="OmniScore")
    axes[2].hist(gaps or [0.0], bins=20)
    axes[2].set(title="(c) pair score gap", xlabel="S_w - S_l")
    dimensions = [d for d in DIMENSIONS if any(row.get(d) is not None for row in scored)]
    matrix = np.array([[row.get(d) if row.get(d) is not None else np.nan for d in dimensions] for row in scored])
    correlation = np.ma.corrcoef(np.ma.masked_invalid(matrix), rowvar=False).filled(np.nan)
    axes[3].imshow(correlation, vmin=-1, vmax=1, cmap="RdBu")
    axes[3].set_xticks(range(len(dimensions)), [d[:10] for d in dimensions], rotation=90, fontsize=6)
    axes[3].set_yticks(range(len(dimensions)), [d[:10] for d in dimensions], fontsize=6)
    axes[3].set_title("(d) dimension correlation")
    return _png(figure)


def format_number(value: float | None, digits: int = 4, sign: bool = False) -> str:
    """`value` with `digits` decimals (and its sign, when `sign`); "n/a" for None and non-finite values."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:{'+' if sign else ''}.{digits}f}"


def unscored_note(count: int | None) -> str:
    """The prompts a summary left out (no seed scored by both models), when there are any."""
    return f" ({count} more prompt(s) left out: no seed scored by both models)" if count else ""


def _interval(values: Sequence[float | None]) -> str:
    return f"[{format_number(values[0])}, {format_number(values[1])}]"


def _attribute(value: Any) -> str:
    """An HTML attribute value, quotes included, escaped."""
    return f"'{html.escape(str(value), quote=True)}'"


def _gain_class(gain: float | None) -> str:
    return "" if gain is None else " class='gain'" if gain > 0 else " class='loss'"


def render_html(summary: dict[str, Any], images: dict[str, str], items: list[dict[str, Any]], notes: list[str]) -> str:
    """The page. `images`: section -> file name beside the page; `items`: gallery prompts, seeds, GIFs, scores."""
    gain = summary["omniscore_gain_mean"]
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'><title>videodpo-ray evaluation</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Before / after alignment</h1>",
        f"<p>{summary['num_prompts']} held-out prompts x {summary['samples_per_prompt']} seeds"
        + unscored_note(summary.get("num_prompts_unscored"))
        + f". Win rate <b>{format_number(summary['win_rate'], 3)}</b> (95% CI {_interval(summary['win_rate_ci95'])}); "
        f"OmniScore {format_number(summary['omniscore_before'])} -> {format_number(summary['omniscore_after'])}, gain "
        f"<b{_gain_class(gain)}>{format_number(gain)}</b> +/- {format_number(summary['omniscore_gain_se'])}"
        " (standard error).</p>",
        "<h2>Dimensions</h2><table><tr><th>dimension</th><th>before</th><th>after</th><th>difference</th>"
        "<th>95% CI</th><th>before (VBench-normalised)</th><th>after (VBench-normalised)</th></tr>",
    ]
    for name, row in summary["dimensions"].items():
        lines.append(
            f"<tr><td>{html.escape(name)}</td><td>{format_number(row['before'])}</td>"
            f"<td>{format_number(row['after'])}</td><td>{format_number(row['difference'])}</td>"
            f"<td>{_interval(row['difference_ci95'])}</td><td>{format_number(row['before_normalised'])}</td>"
            f"<td>{format_number(row['after_normalised'])}</td></tr>"
        )
    lines.append("</table><h2>VBench aggregates over the dimensions present</h2><table><tr><th>model</th>"
                 "<th>quality</th><th>semantic</th><th>total</th></tr>")
    for which, scores in summary["vbench"].items():
        lines.append(f"<tr><td>{html.escape(which)}</td><td>{format_number(scores['quality'])}</td>"
                     f"<td>{format_number(scores['semantic'])}</td><td>{format_number(scores.get('total'))}</td></tr>")
    missing = summary["vbench"]["base"]["missing"]
    lines.append(f"</table><p>Missing dimensions: {html.escape(', '.join(missing)) or 'none'}.</p>")
    for section, title in (("curves", "Training curves"), ("analysis", "Generated training data")):
        if section in images:
            image = f"<img class='plot' src={_attribute(images[section])} alt={_attribute(title)}>"
            lines.append(f"<h2>{title}</h2>{image}")
    lines += [f"<p><i>{html.escape(note)}</i></p>" for note in notes]
    lines.append("<h2>Gallery: the same prompt and seed, before and after</h2>")
    for item in items:
        caption = html.escape(item["prompt"])
        for which in ("base", "tuned"):
            alt = _attribute(f"{which}: {item['prompt']}")
            lines.append(
                f"<figure><img src={_attribute(item[which])} width='128' alt={alt}>"
                f"<figcaption>{which}, seed {item['seed']}: {caption}<br>OmniScore "
                f"{format_number(item[which + '_score'])}</figcaption></figure>"
            )
    lines.append("</body></html>")
    return "\n".join(lines) + "\n"


def write_files(out: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.write_bytes_atomic(storage.join(out, name), data)


def gallery_file(position: int, prompt_id: str, which: str) -> str:
    """The GIF of one side of the prompt at `position`: a flat name under `gallery/`, unique by the position, with
    the prompt id's characters outside [A-Za-z0-9_-] made `_` (nothing a path, a URL or an attribute reads)."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", prompt_id)[:GALLERY_ID_CHARS]
    return f"gallery/{position:03d}-{readable}-{which}.gif"


def gallery(out: str, prompts: Sequence[Any], results: list[dict[str, Any]], count: int) -> tuple[dict, list]:
    """GIFs of sample 0 of the first `count` prompts, both models: ({file name: bytes}, gallery items)."""
    from videodpo_ray.video import decode_mp4, encode_gif

    wanted = {f"{prompt.prompt_id}-0": (position, prompt) for position, prompt in enumerate(prompts[:count])}
    videos: dict[tuple[str, str], tuple[bytes, int]] = {}
    for which in ("base", "tuned"):
        for info in shards.list_shards(storage.join(out, which), "samples"):
            table = shards.read_shard(info).select(["sample_id", "video", "fps"])
            for row in table.to_pylist():
                if row["sample_id"] in wanted:
                    videos[(which, row["sample_id"])] = (row["video"], row["fps"])
    scores = {(row["model"], row["prompt_id"]): row for row in results if row["sample_index"] == 0}
    files, items = {}, []
    for sample_id, (position, prompt) in wanted.items():
        if not all((which, sample_id) in videos for which in ("base", "tuned")):
            continue
        item = {"prompt": prompt.prompt, "seed": scores[("base", prompt.prompt_id)]["seed"]}
        for which in ("base", "tuned"):
            data, fps = videos[(which, sample_id)]
            name = gallery_file(position, prompt.prompt_id, which)
            files[name] = encode_gif(decode_mp4(data, sample_id)[0], fps)
            item[which], item[f"{which}_score"] = name, scores[(which, prompt.prompt_id)]["omniscore"]
        items.append(item)
    return files, items


def write_report(
    out: str,
    summary: dict[str, Any],
    results: list[dict[str, Any]],
    prompts: Sequence[Any],
    *,
    run_url: str | None,
    training_data: str | None,
    gallery_prompts: int,
) -> str:
    """Write `index.html` with its images under `out`; return the page's URL."""
    from videodpo_ray.training.checkpoint import read_tensorboard_scalars

    files, images, notes = {}, {}, []
    curves = curves_png(read_tensorboard_scalars(run_url)) if run_url else None
    if curves is None:
        notes.append("No training curves: the tuned model was given as an export without its run directory.")
    else:
        files["curves.png"], images["curves"] = curves, "curves.png"
    analysis = analysis_png(training_data) if training_data else None
    if training_data is None:
        notes.append("No analysis panels: set training_data to the generate/pair output the run trained on.")
    elif analysis is None:
        notes.append(f"No analysis panels: training_data {training_data} has no scored sample.")
    else:
        files["analysis.png"], images["analysis"] = analysis, "analysis.png"
    gifs, items = gallery(out, prompts, results, gallery_prompts)
    files.update(gifs)
    files["index.html"] = render_html(summary, images, items, notes).encode()
    write_files(out, files)
    return storage.join(out, "index.html")
