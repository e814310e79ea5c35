#!/usr/bin/env python3
"""Turns benches/compare.sh's results.jsonl into the markdown of docs/benchmarks.md.

    python3 benches/report.py /tmp/ternmq-bench.XXXX/results.jsonl

Standard library only.
"""

import json
import statistics
import sys
from collections import defaultdict

THROUGHPUT = ["fanin-q0", "fanin-q1", "fanout-q0", "fanout-q1", "p2p-q0", "p2p-q1", "p2p-q2"]
LATENCY = ["latency-q0", "latency-q1"]
PEERS = ["mosquitto", "rumqttd"]
# ternmq with $SYS every second and /metrics scraped every second (compare.sh
# --brokers "ternmq ternmq-observed"): compared with ternmq in its own table.
OBSERVED = "ternmq-observed"


def load(path):
    meta, end, runs, rss = {}, {}, defaultdict(list), defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            kind = r.get("type")
            if kind == "meta":
                meta = r
            elif kind == "end":
                end = r
            elif kind == "rss":
                rss[r["broker"]][r["round"]] = r["rss_kb"]
            elif "label" in r and r["label"].count("|") == 2:
                broker, _round, name = r["label"].split("|")
                runs[(name, broker)].append(r)
    return meta, end, runs, rss


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_rate(v):
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def fmt_us(v):
    if v is None:
        return "–"
    if v < 1000:
        return f"{v:.0f} µs"
    if v < 1e6:
        return f"{v / 1000:.2f} ms"
    return f"{v / 1e6:.2f} s"


def fmt_mib(kb):
    return "–" if kb is None else f"{kb / 1024:.1f} MiB"


def ratio(a, b):
    if a is None or not b:
        return "–"
    return f"{a / b:.2f}×"


def problems(rs):
    """Loss, duplicates and errors over the rounds, as a short note."""
    notes = []
    lost = sum(r.get("lost", 0) for r in rs)
    dup = sum(r.get("duplicates", 0) for r in rs)
    failed = sum(1 for r in rs if not r.get("ok", False))
    if lost:
        notes.append(f"lost {lost}")
    if dup:
        notes.append(f"dup {dup}")
    if failed:
        notes.append(f"**{failed}/{len(rs)} failed**")
    return ", ".join(notes) or "0"


def throughput_row(name, broker, rs, base):
    rates = [r["receive_rate"] for r in rs if r.get("receive_rate") is not None]
    rate = med(rates)
    spread = f" ({fmt_rate(min(rates))}–{fmt_rate(max(rates))})" if len(rates) > 1 else ""
    cpu = med([r.get("broker_cpu_s") for r in rs])
    unique = med([r.get("unique") for r in rs])
    cpu_per_msg = cpu * 1e6 / unique if cpu is not None and unique else None
    peak = max((r.get("rss_peak_kb") or 0 for r in rs), default=None)
    cells = [
        name,
        broker,
        fmt_rate(rate) + spread,
        fmt_us(med([r.get("p50_us") for r in rs])),
        fmt_us(med([r.get("p99_us") for r in rs])),
        fmt_mib(peak),
        "–" if cpu is None else f"{cpu:.1f}",
        "–" if cpu_per_msg is None else f"{cpu_per_msg:.2f}",
        problems(rs),
    ]
    if broker == "ternmq":
        cells += [ratio(rate, base.get(p)) for p in PEERS]
    else:
        cells += ["", ""]
    return cells, rate


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def observed(runs):
    """ternmq-observed against ternmq, scenario by scenario: the overhead of $SYS and
    /metrics, with each side's spread across rounds to judge it against the noise."""
    print("### Observability overhead ($SYS every 1 s, /metrics scraped every 1 s)")
    print()
    header = ["scenario", "ternmq (off)", "ternmq-observed", "observed / off",
              "CPU µs/msg off → observed"]
    rows = []
    for name in THROUGHPUT + LATENCY:
        off, on = runs.get((name, "ternmq")), runs.get((name, OBSERVED))
        if not off or not on:
            continue
        key = "p99_us" if name in LATENCY else "receive_rate"
        show = fmt_us if name in LATENCY else fmt_rate

        def cell(rs):
            vals = [r.get(key) for r in rs if r.get(key) is not None]
            if not vals:
                return "–", None
            spread = f" ({show(min(vals))}–{show(max(vals))})" if len(vals) > 1 else ""
            return show(med(vals)) + spread + (" p99" if name in LATENCY else ""), med(vals)

        def cpu(rs):
            c, u = med([r.get("broker_cpu_s") for r in rs]), med([r.get("unique") for r in rs])
            return f"{c * 1e6 / u:.2f}" if c is not None and u else "–"

        (a, va), (b, vb) = cell(off), cell(on)
        rows.append([name, a, b, ratio(vb, va), f"{cpu(off)} → {cpu(on)}"])
    print(table(header, rows))
    print()


def main(path):
    meta, end, runs, rss = load(path)
    brokers = [b for b in ["ternmq", OBSERVED, "mosquitto", "rumqttd"]
               if any(k[1] == b for k in runs)]
    verdicts = []
    print(f"Measured {meta.get('date', '?')} at commit `{meta.get('commit', '?')}` on "
          f"{meta.get('cores', '?')} cores ({meta.get('cpu', '?')}), "
          f"{meta.get('memory_gib', '?')} GiB; load average {meta.get('load_before', '?')} "
          f"before, {end.get('load_after', '?')} after; {meta.get('rounds', '?')} round(s) of "
          f"{meta.get('duration', '?')} s per run. {meta.get('versions', '')}.")
    print()

    print("### Throughput (messages received by subscribers per second)")
    print()
    header = ["scenario", "broker", "msg/s median (min–max)", "p50", "p99", "peak RSS",
              "broker CPU s", "CPU µs/msg", "loss", "vs mosquitto", "vs rumqttd"]
    rows = []
    for name in THROUGHPUT:
        base = {}
        stats = {}
        for b in brokers:
            if runs.get((name, b)):
                _, base[b] = throughput_row(name, b, runs[(name, b)], {})
        for b in brokers:
            rs = runs.get((name, b))
            if rs:
                row, stats[b] = throughput_row(name, b, rs, base)
                rows.append(row)
        t = stats.get("ternmq")
        if t is not None and not name.startswith("p2p-q2"):
            if stats.get("rumqttd"):
                verdicts.append((f"{name}: throughput ≥ rumqttd", t >= stats["rumqttd"],
                                 ratio(t, stats["rumqttd"])))
            if stats.get("mosquitto"):
                verdicts.append((f"{name}: throughput ≥ 2× mosquitto",
                                 t >= 2 * stats["mosquitto"], ratio(t, stats["mosquitto"])))
        for b in brokers:
            peak = max((r.get("rss_peak_kb") or 0 for r in runs.get((name, b), [])), default=0)
            stats[b + ".peak"] = peak
        if stats.get("ternmq.peak") and stats.get("mosquitto.peak"):
            verdicts.append((f"{name}: peak RSS ≤ 2× mosquitto",
                             stats["ternmq.peak"] <= 2 * stats["mosquitto.peak"],
                             ratio(stats["ternmq.peak"], stats["mosquitto.peak"])))
    print(table(header, rows))
    print()

    print("### Latency at a fixed rate (10 publisher/subscriber pairs, 5,000 msg/s in total)")
    print()
    header = ["scenario", "broker", "p50", "p99", "p99.9", "max", "loss",
              "p99 vs mosquitto", "p99 vs rumqttd"]
    rows = []
    for name in LATENCY:
        p99s = {}
        for b in brokers:
            rs = runs.get((name, b))
            if rs:
                p99s[b] = med([r.get("p99_us") for r in rs])
        for b in brokers:
            rs = runs.get((name, b))
            if not rs:
                continue
            row = [name, b] + [fmt_us(med([r.get(k) for r in rs]))
                               for k in ["p50_us", "p99_us", "p999_us", "max_us"]]
            row.append(problems(rs))
            if b == "ternmq":
                row += [ratio(p99s.get(b), p99s.get(p)) for p in PEERS]
            else:
                row += ["", ""]
            rows.append(row)
        if p99s.get("ternmq") is not None and p99s.get("mosquitto"):
            verdicts.append((f"{name}: p99 ≤ mosquitto's", p99s["ternmq"] <= p99s["mosquitto"],
                             f"{fmt_us(p99s['ternmq'])} vs {fmt_us(p99s['mosquitto'])}"))
    print(table(header, rows))
    print()

    print("### Idle connections")
    print()
    header = ["broker", "connections", "connect rate (conn/s)", "RSS before", "RSS connected",
              "bytes per connection", "RSS after close", "failed"]
    rows = []
    idle = {}
    for b in brokers:
        rs = runs.get(("idle", b))
        if not rs:
            continue
        rate = med([r.get("connect_rate") for r in rs])
        per = med([r.get("bytes_per_connection") for r in rs])
        idle[b] = (rate, per)
        rows.append([
            b,
            rs[0].get("connections", "–"),
            fmt_rate(rate),
            fmt_mib(med([r.get("rss_before_kb") for r in rs])),
            fmt_mib(med([r.get("rss_connected_kb") for r in rs])),
            "–" if per is None else f"{per:.0f}",
            fmt_mib(med([r.get("rss_after_kb") for r in rs])),
            sum(r.get("failed", 0) for r in rs) + sum(1 for r in rs if "error" in r),
        ])
    print(table(header, rows))
    print()
    if "ternmq" in idle:
        rate, per = idle["ternmq"]
        if per is not None:
            verdicts.append(("idle: ≤ 2 KB RSS per connection", per <= 2048, f"{per:.0f} B"))
        if "mosquitto" in idle and rate and idle["mosquitto"][0]:
            verdicts.append(("idle: connect rate ≥ mosquitto's", rate >= idle["mosquitto"][0],
                             ratio(rate, idle["mosquitto"][0])))

    print("### Broker memory after each round (RSS once every client has left)")
    print()
    rounds = sorted({r for b in rss for r in rss[b]})
    header = ["broker", "at start"] + [f"after round {r}" for r in rounds if r > 0]
    rows = [[b] + [fmt_mib(rss[b].get(r)) for r in rounds] for b in brokers if b in rss]
    print(table(header, rows))
    print()
    t = rss.get("ternmq", {})
    later = [t[r] for r in rounds if r > 0 and r in t]
    if later:
        # "Near baseline": no growth from the first round to the last beyond 10% + 2 MiB.
        ok = later[-1] <= later[0] * 1.10 + 2048
        verdicts.append(("memory: no growth across rounds", ok,
                         f"{fmt_mib(later[0])} → {fmt_mib(later[-1])}"))

    failed_qos = [k for k, rs in runs.items()
                  if k[1] == "ternmq" and any(not r.get("ok", False) for r in rs)
                  and not k[0].endswith("q0")]
    verdicts.append(("no loss or failure at QoS 1/2 (ternmq)", not failed_qos,
                     ", ".join(k[0] for k in failed_qos) or "none"))

    if any(k[1] == OBSERVED for k in runs):
        observed(runs)

    print("### Targets (ternmq)")
    print()
    rows = [[what, "met" if ok else "**not met**", detail] for what, ok, detail in verdicts]
    print(table(["target", "verdict", "measured"], rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py results.jsonl")
    main(sys.argv[1])
