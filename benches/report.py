#!/usr/bin/env python3
"""Turns benches/compare.sh's results.jsonl into the markdown of docs/benchmarks.md.

    python3 benches/report.py /tmp/ternmq-bench.XXXX/results.jsonl

Standard library only.
"""

import json
import statistics
import sys
from collections import defaultdict

THROUGHPUT = ["fanin-q0", "fanin-q1", "fanin8-q0", "fanin8-q1", "fanout-q0", "fanout-q1",
              "p2p-q0", "p2p-q1", "p2p-q2", "p2p50-q1"]
LATENCY = ["latency-q0", "latency-q1", "latency50k-q0", "latency50k-q1"]
IOT = ["iot-sat", "iot-half"]
PEERS = ["mosquitto", "rumqttd"]
# Other ternmq brokers, each compared with ternmq in a table of its own: with $SYS every
# second and /metrics scraped every second; another binary (TERNMQ_BASE, "before");
# one worker thread.
OBSERVED = "ternmq-observed"
VARIANTS = {
    OBSERVED: "Observability overhead ($SYS every 1 s, /metrics scraped every 1 s)",
    "ternmq-base": "Before and after (ternmq-base: the binary at $TERNMQ_BASE)",
    "ternmq-1t": "Worker threads (ternmq-1t: one worker thread, ternmq: one per core)",
}
# Issue 12's targets: broker CPU per delivered message, µs.
CPU_TARGETS = {"fanin8-q0": 2.0, "fanin8-q1": 2.4, "p2p-q1": 1.9, "p2p50-q1": 1.9}
# p99 latency, as a fraction of mosquitto's.
P99_TARGETS = {"latency-q0": 0.8, "latency-q1": 0.8, "latency50k-q0": 0.5, "latency50k-q1": 0.5}


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


def cpu_per_msg(rs):
    """Median broker CPU seconds over median messages received, in µs."""
    cpu, unique = med([r.get("broker_cpu_s") for r in rs]), med([r.get("unique") for r in rs])
    return cpu * 1e6 / unique if cpu is not None and unique else None


def fmt_cpu(v):
    return "–" if v is None else f"{v:.2f}"


def throughput_row(name, broker, rs, base, base_cpu):
    rates = [r["receive_rate"] for r in rs if r.get("receive_rate") is not None]
    rate = med(rates)
    spread = f" ({fmt_rate(min(rates))}–{fmt_rate(max(rates))})" if len(rates) > 1 else ""
    cpu = med([r.get("broker_cpu_s") for r in rs])
    per_msg = cpu_per_msg(rs)
    peak = max((r.get("rss_peak_kb") or 0 for r in rs), default=None)
    cells = [
        name,
        broker,
        fmt_rate(rate) + spread,
        fmt_us(med([r.get("p50_us") for r in rs])),
        fmt_us(med([r.get("p99_us") for r in rs])),
        fmt_mib(peak),
        "–" if cpu is None else f"{cpu:.1f}",
        fmt_cpu(per_msg),
        problems(rs),
    ]
    if broker == "ternmq":
        cells += [ratio(rate, base.get(p)) for p in PEERS]
        cells += [ratio(per_msg, base_cpu.get(p)) for p in PEERS]
    else:
        cells += ["", "", "", ""]
    return cells, rate, per_msg


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def variant(runs, other):
    """Another ternmq broker against ternmq, scenario by scenario, with each side's spread
    across rounds to judge the difference against the noise."""
    print(f"### {VARIANTS[other]}")
    print()
    header = ["scenario", "ternmq", other, f"{other} / ternmq",
              f"CPU µs/msg ternmq → {other}"]
    rows = []
    for name in THROUGHPUT + LATENCY + IOT:
        off, on = runs.get((name, "ternmq")), runs.get((name, other))
        if not off or not on:
            continue
        key = "p99_us" if name in LATENCY or name == "iot-half" else "receive_rate"
        show = fmt_us if key == "p99_us" else fmt_rate

        def cell(rs):
            vals = [r.get(key) for r in rs if r.get(key) is not None]
            if not vals:
                return "–", None
            spread = f" ({show(min(vals))}–{show(max(vals))})" if len(vals) > 1 else ""
            return show(med(vals)) + spread + (" p99" if key == "p99_us" else ""), med(vals)

        (a, va), (b, vb) = cell(off), cell(on)
        rows.append([name, a, b, ratio(vb, va),
                     f"{fmt_cpu(cpu_per_msg(off))} → {fmt_cpu(cpu_per_msg(on))}"])
    print(table(header, rows))
    print()


def main(path):
    meta, end, runs, rss = load(path)
    brokers = [b for b in ["ternmq", *VARIANTS, "mosquitto", "rumqttd"]
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
              "broker CPU s", "CPU µs/msg", "loss", "msg/s vs mosquitto", "msg/s vs rumqttd",
              "CPU/msg vs mosquitto", "CPU/msg vs rumqttd"]
    rows = []
    for name in THROUGHPUT:
        base, base_cpu = {}, {}
        stats = {}
        for b in brokers:
            if runs.get((name, b)):
                _, base[b], base_cpu[b] = throughput_row(name, b, runs[(name, b)], {}, {})
        for b in brokers:
            rs = runs.get((name, b))
            if rs:
                row, stats[b], _ = throughput_row(name, b, rs, base, base_cpu)
                rows.append(row)
        if name in CPU_TARGETS and runs.get((name, "ternmq")):
            c = cpu_per_msg(runs[(name, "ternmq")])
            verdicts.append((f"{name}: broker CPU ≤ {CPU_TARGETS[name]} µs/msg",
                             c is not None and c <= CPU_TARGETS[name], f"{fmt_cpu(c)} µs"))
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

    print("### Latency at a fixed rate (10 publisher/subscriber pairs; 5,000 or 50,000 msg/s "
          "in total)")
    print()
    header = ["scenario", "broker", "p50", "p99", "p99.9", "max", "CPU µs/msg", "loss",
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
            row.append(fmt_cpu(cpu_per_msg(rs)))
            row.append(problems(rs))
            if b == "ternmq":
                row += [ratio(p99s.get(b), p99s.get(p)) for p in PEERS]
            else:
                row += ["", ""]
            rows.append(row)
        if p99s.get("ternmq") is not None and p99s.get("mosquitto"):
            limit = P99_TARGETS.get(name, 1.0)
            verdicts.append((f"{name}: p99 ≤ {limit}× mosquitto's",
                             p99s["ternmq"] <= limit * p99s["mosquitto"],
                             f"{fmt_us(p99s['ternmq'])} vs {fmt_us(p99s['mosquitto'])} "
                             f"({ratio(p99s['ternmq'], p99s['mosquitto'])})"))
    print(table(header, rows))
    print()

    iot_rows = []
    for b in brokers:
        sat, half = runs.get(("iot-sat", b), []), runs.get(("iot-half", b), [])
        if not sat and not half:
            continue
        rates = [r["receive_rate"] for r in sat if r.get("receive_rate") is not None]
        iot_rows.append([
            b,
            fmt_rate(med(rates)) + (f" ({fmt_rate(min(rates))}–{fmt_rate(max(rates))})"
                                    if len(rates) > 1 else ""),
            fmt_rate(med([r.get("publish_rate") for r in sat])),
            fmt_cpu(cpu_per_msg(sat)),
            fmt_rate(med([r.get("rate_target") for r in half])),
            fmt_us(med([r.get("p50_us") for r in half])),
            fmt_us(med([r.get("p99_us") for r in half])),
            fmt_cpu(cpu_per_msg(half)),
            fmt_mib(max((r.get("rss_peak_kb") or 0 for r in sat + half), default=None)),
            problems(sat + half),
        ])
    if iot_rows:
        print("### IoT: 10,000 devices, 100 dashboards, 100,000 subscriptions")
        print()
        print(table(["broker", "delivered msg/s at saturation", "publishes/s",
                     "CPU µs/msg", "half rate (publishes/s)", "p50 at half", "p99 at half",
                     "CPU µs/msg at half", "peak RSS", "loss"], iot_rows))
        print()

    print("### Idle connections")
    print()
    header = ["broker", "connections", "connect rate (conn/s)", "broker CPU µs/connection",
              "RSS before", "RSS connected", "bytes per connection", "RSS after close",
              "failed"]
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
            fmt_cpu(med([r.get("cpu_us_per_connection") for r in rs])),
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
            verdicts.append(("idle: ≤ 1,000 B RSS per connection", per <= 1000, f"{per:.0f} B"))
        if "mosquitto" in idle and rate and idle["mosquitto"][0]:
            verdicts.append(("idle: connect rate ≥ 1.2× mosquitto's",
                             rate >= 1.2 * idle["mosquitto"][0],
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

    for other in VARIANTS:
        if any(k[1] == other for k in runs):
            variant(runs, other)

    print("### Targets (ternmq)")
    print()
    rows = [[what, "met" if ok else "**not met**", detail] for what, ok, detail in verdicts]
    print(table(["target", "verdict", "measured"], rows))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py results.jsonl")
    main(sys.argv[1])
