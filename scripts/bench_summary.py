"""Medians of the "no speed lost" runs of two code states (``scripts/device-bench.sh`` output dirs).

``python scripts/bench_summary.py BEFORE_DIR AFTER_DIR [--json out.json]`` prints one markdown table:
per figure the median over the runs of each state and the after/before ratio, with the spread
(min-max) of each so a change can be told from run-to-run noise. Storage ratios are to the
same-run baselines (raw O_DIRECT for the kvikio and posix paths, pinned H2D/D2H for mapped).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics


def _storage(d: str) -> dict:
    out: dict = {}
    for f in sorted(glob.glob(os.path.join(d, "bench_storage_shm-r*.json"))):
        r = json.load(open(f))
        rows = {(x["size"], x["path"]): x for x in r["rows"]}
        for (size, path), x in rows.items():
            if not path.startswith("library-"):
                continue
            raw = rows.get((size, "raw"))
            for op, h in (("put", r["d2h_gbps"]), ("get", r["h2d_gbps"])):
                v = x[f"{op} GB/s"]
                out.setdefault(f"{size} {path} {op} GB/s", []).append(v)
                base, name = (h, "H2D/D2H") if path == "library-mapped" else (raw[f"{op} GB/s"], "raw")
                out.setdefault(f"{size} {path} {op} / {name}", []).append(v / base)
    for f in sorted(glob.glob(os.path.join(d, "bench_storage_ops64k-r*.json"))):
        r = json.load(open(f))
        for x in r["rows"]:
            if x["path"].startswith("library-"):
                for op in ("put", "get"):
                    out.setdefault(f"64 KiB host {x['path']} {op}s/s", []).append(x[f"{op} GB/s"] * 1e9 / 65536)
    return out


def _ttft(d: str) -> dict:
    out: dict = {}
    for f in sorted(glob.glob(os.path.join(d, "bench_ttft*.json"))):
        for x in json.load(open(f))["rows"]:
            out.setdefault(f"ttft {x['tokens']} tokens speed-up", []).append(x["speedup"])
            out.setdefault(f"ttft {x['tokens']} tokens retrieve ms", []).extend(x.get("retrieve ms all", [x["retrieve ms"]]))
    return out


def _shared(d: str) -> dict:
    out: dict = {}
    for f in sorted(glob.glob(os.path.join(d, "shared-r*.json"))):
        r = json.load(open(f))
        for x in r.get("read", []):
            out.setdefault(f"shared {x['readers']} reader(s) 1 MiB GB/s", []).append(x["shared GB/s"])
            out.setdefault(f"shared {x['readers']} reader(s) / plain preadv", []).append(x["ratio"])
        out.setdefault("shared lookup 512 chunks p50 us", []).append(r["lookup_512_p50_us"])
    return out


def collect(d: str) -> dict:
    return {**_storage(d), **_ttft(d), **_shared(d)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    b, c = collect(a.before), collect(a.after)
    rows = []
    print("| figure | before median (min-max) | after median (min-max) | after / before |")
    print("| --- | ---: | ---: | ---: |")
    for k in sorted(set(b) | set(c), key=lambda k: (k.split(" ")[0], k)):
        vb, vc = b.get(k, []), c.get(k, [])
        mb = statistics.median(vb) if vb else None
        mc = statistics.median(vc) if vc else None
        ratio = mc / mb if mb and mc else None
        rows.append({"figure": k, "before": vb, "after": vc, "before_median": mb, "after_median": mc,
                     "ratio": ratio})
        fmt = lambda v: f"{statistics.median(v):.3g} ({min(v):.3g}-{max(v):.3g})" if v else "-"  # noqa: E731
        print(f"| {k} | {fmt(vb)} | {fmt(vc)} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
