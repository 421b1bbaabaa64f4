"""metrics.json and the console table of evaluate.py."""

from __future__ import annotations

import json
from pathlib import Path

from src.atomic import write_text as atomic_write_text

# Float entries of a sample set that are not metric values.
_NOT_METRICS = {"metrics_seconds", "guidance_scale", "ema_std"}


class Report:
    """metrics.json, rewritten atomically after every stage so a late failure keeps the earlier results.

    `expect(parts)` names what the command was asked for; `done(part)` ticks one off. When a stop signal
    ends the run, `stopped(...)` marks the file partial and lists the parts still missing."""

    def __init__(self, path: Path, content: dict):
        self.path, self.content = path, content
        self.pending: list[str] = []
        self.write()

    def expect(self, parts: list[str]) -> None:
        self.pending.extend(parts)

    def done(self, part: str) -> None:
        self.pending.remove(part)

    def stopped(self, signal_name: str) -> None:
        self.update(partial=True, stopped_by=signal_name, missing=list(self.pending))

    def update(self, **entries) -> None:
        self.content.update(entries)
        self.write()

    def updater(self, entry: dict):
        """update(**entries) for a dict nested in the report: adds to it and rewrites the file."""

        def update(**entries) -> None:
            entry.update(entries)
            self.write()

        return update

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.content, indent=2) + "\n")


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metric_rows(entry: dict) -> list[tuple[str, str]]:
    if "runs" in entry:  # several seeds: each run, then the summary
        rows = [(f"seed {r['seed']} {k}", v) for r in entry["runs"] for k, v in _metric_rows(r)]
        rows += [
            (f"{key} over seeds", f"mean {s['mean']:.4g}, std {s['std']:.3g}, min {s['min']:.4g}, max {s['max']:.4g}")
            for key, s in entry.get("summary", {}).items()
        ]
        return rows
    rows = []
    s = entry.get("samples")
    if s is not None and "sampler" not in s:  # a file of samples (samples=)
        rows.append(("samples", f"{s['num_samples']} images {'x'.join(map(str, s['image_shape']))}"))
    elif s is not None:
        sampler = s["sampler"]
        rows.append(
            (
                "samples",
                f"{s['num_samples']} ({sampler.get('sampler')}, {len(s['timesteps'])} steps = {s['nfe']} "
                f"NFE, eta {sampler.get('eta')}, image seeds {s['image_seeds'][0]}..{s['image_seeds'][1]}; "
                f"{s['images_per_sec']} images/s) -> {s['npz']}",
            )
        )
    values = {k: v for k, v in entry.items() if isinstance(v, float) and k not in _NOT_METRICS}  # the metrics
    if "extractor" in entry:
        ref = entry["reference"]
        rows.append(
            (
                "scored",
                f"with {entry['extractor']['name']} against reference={ref.get('spec')} "
                f"({ref.get('dataset')} {ref.get('split')}, {ref.get('num_images')} images)",
            )
        )
        rows.extend((k, _format(v)) for k, v in values.items())
    for key, why in entry.get("metrics_unavailable", {}).items():
        rows.append((f"{key}", f"not computed: {why}"))
    return rows


def _sample_rows(content: dict) -> list[tuple[str, str]]:
    """The rows of an entry's sample sets: per guidance scale when guided, else per seed."""
    rows = []
    if "guidance" in content:
        g = content["guidance"]
        classifier = g["classifier"]
        rows.append(
            (
                "guidance",
                f"{g['num_classes']} classes, {g['labels']}"
                + (f"; classifier {classifier['ckpt_path']} at scale {classifier['scale']}" if classifier else ""),
            )
        )
        for run_entry in g["runs"]:
            rows.extend((f"w={run_entry['guidance_scale']:g} {key}", value) for key, value in _metric_rows(run_entry))
    else:
        rows.extend(_metric_rows(content))
    return rows


def print_table(content: dict, path: Path) -> None:
    rows = []
    if "checkpoint" in content:
        rows.append(("checkpoint", f"{content['checkpoint']} (step {content['global_step']})"))
    if "posthoc_ema" in content:  # an ema_std sweep: each width's rows
        for run_entry in content["posthoc_ema"]["runs"]:
            rows.extend((f"ema_std={run_entry['ema_std']:g} {key}", value) for key, value in _sample_rows(run_entry))
    else:
        rows.extend(_sample_rows(content))
    for key in ("nll", "nll_null_label"):
        if key in content:
            n = content[key]
            rows.append(
                (
                    f"NLL (val, {n['conditioning']})",
                    f"{n['bpd']:.4f} bits/dim over {n['num_images']} images, T={n['num_timesteps']}: "
                    f"L_T {n['prior_bpd']:.4f} + L_1..T-1 {n['kl_bpd']:.4f} + L_0 {n['decoder_bpd']:.4f}",
                )
            )
    rows.extend(("note", note) for note in content.get("protocol", {}).get("notes", []))
    rows.append(("metrics", str(path)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), flush=True)
