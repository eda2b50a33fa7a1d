"""PNG plots of the benchmarks' JSON lines: one chart per measured quantity,
log-log against length (or any other x), every implementation one line.

    python benchmarks/plots.py results.jsonl --x length \\
        --metrics ms,peak_mib --group implementation --output plot.png

The benchmark scripts call `write_plot` on their own lines as they finish.
"""

import argparse
import json
import os

# Readable axis labels for the quantities the benchmarks print.
LABELS = {
    "ms": "time (ms)",
    "cpu_ms": "CPU time, all threads (ms)",
    "step_s": "step time (s)",
    "cpu_s": "CPU time, all threads (s)",
    "peak_mib": "peak memory (MiB)",
    "steady_mib": "peak memory while stepping (MiB)",
    "temporary_gib": "planned temporary memory (GiB)",
    "temp_mib": "planned temporary memory (MiB)",
    "length": "sequence length (tokens)",
    "depth": "blocks",
}


def write_plot(path, records, x, metrics, group, title=None):
    """Writes one PNG with a log-log panel per metric.

    Args:
        path: str, the PNG file to write.
        records: list of dicts (the benchmark's JSON lines); those without
            `x`, `group` or a metric are left out of that metric's panel.
        x: str, the key plotted along the horizontal axis.
        metrics: list of str, one panel per key.
        group: str or list of str, the key(s) whose values name a line.
        title: str or None, the figure's title.

    Returns:
        `path`, or None when no record had anything to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    keys = [group] if isinstance(group, str) else list(group)
    panels = []
    for metric in metrics:
        lines = {}
        for record in records:
            value = record.get(metric)
            if record.get(x) is None or not isinstance(value, (int, float)):
                continue
            if any(key not in record for key in keys):
                continue
            name = ", ".join(str(record[key]) for key in keys)
            lines.setdefault(name, []).append((record[x], value))
        if lines:
            panels.append((metric, lines))
    if not panels:
        return None
    figure, axes = pyplot.subplots(1, len(panels), squeeze=False,
                                   figsize=(5.5 * len(panels), 4.2))
    for axis, (metric, lines) in zip(axes[0], panels):
        for name, points in lines.items():
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points],
                      marker="o", label=name)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(LABELS.get(x, x))
        axis.set_ylabel(LABELS.get(metric, metric))
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jsonl", help="a file of benchmark JSON lines")
    parser.add_argument("--x", default="length")
    parser.add_argument("--metrics", default="ms,peak_mib")
    parser.add_argument("--group", default="implementation",
                        help="comma-separated keys naming each line")
    parser.add_argument("--title", default=None)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    with open(args.jsonl) as lines:
        records = [json.loads(line) for line in lines
                   if line.startswith("{")]
    written = write_plot(args.output, records, args.x,
                         args.metrics.split(","), args.group.split(","),
                         args.title)
    print(written or "nothing to plot")


if __name__ == "__main__":
    main()
