"""Draw learning curves (PNG) from one or more --metrics-file JSON-lines files.

    python scripts/plot_metrics.py runs/cpu_demo/metrics.jsonl --out runs/cpu_demo/curves.png
    python scripts/plot_metrics.py runs/*/metrics.jsonl --labels token_mean seq_mean ... \\
        --keys reward_mean entropy --smooth 10 --out docs/img/modes.png

One panel per metric key, one line per file (label: --labels, else the file's parent directory). Curves
are a trailing moving average over --smooth steps (1: raw values); --log-keys draws those metrics on a log
y-axis.
"""

import argparse
import json
import os
import sys


def read_metrics(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def smooth(values, window):
    out, acc = [], []
    for v in values:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", help="metrics JSON-lines files")
    p.add_argument("--labels", nargs="*", default=None, help="one label per file")
    p.add_argument("--keys", nargs="*", default=["reward_mean", "entropy", "grad_norm", "response_length"])
    p.add_argument("--smooth", type=int, default=1, help="moving-average window in steps")
    p.add_argument("--log-keys", nargs="*", default=[], help="metrics drawn on a log y-axis")
    p.add_argument("--title", default=None)
    p.add_argument("--out", required=True, help="PNG path")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.files):
        p.error(f"{len(args.labels)} labels for {len(args.files)} files")
    if args.smooth < 1:
        p.error("--smooth must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(f))) for f in args.files]
    runs = [read_metrics(f) for f in args.files]
    fig, axes = plt.subplots(1, len(args.keys), figsize=(4.2 * len(args.keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for label, rows in zip(labels, runs):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if not pts:
                raise SystemExit(f"metric {key!r} not found in the run labelled {label!r}")
            ax.plot([s for s, _ in pts], smooth([v for _, v in pts], args.smooth), label=label, lw=1.4)
        ax.set_xlabel("step")
        ax.set_title(key + (" (log)" if key in args.log_keys else ""))
        if key in args.log_keys:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
