#!/usr/bin/env python3
"""Renders the harness's JSON (nightlight, paho-lesson and the CPU floor) as a Markdown table."""
import json
import platform
import sys

data = json.load(open(sys.argv[1]))
peers = data["peers"]
ours, lesson = peers["nightlight"], peers["paho-lesson"]

ROWS = [
    ("start-up, spawn -> first telemetry", "startup_ms", 1, "ms", 0.25),
    ("VmRSS at ready + 10 s", "rss_kb", 1 / 1024, "MiB", 0.2),
    ("idle CPU, 20 s at the 5 s interval", "idle_cpu_s_per_window", 1000, "ms", 0.5),
    ("CPU per 1000 readings at 10 ms (queue on)", "fast_cpu_s_per_1000_msgs", 1000, "ms", 0.25),
    ("CPU for 500 commands", "cpu_s_per_500_commands", 1000, "ms", None),
    ("command -> LED one way, p50", "oneway_publish_to_switch.p50_us", 1, "µs", 0.8),
    ("command -> LED one way, p99", "oneway_publish_to_switch.p99_us", 1, "µs", 0.8),
    ("command -> LED one way, max", "oneway_publish_to_switch.max_us", 1, "µs", None),
]


def median(peer, key):
    s = peer["summary"].get(key)
    return None if s is None else s["median"]


print("| median of %d runs | nightlight | lesson (paho) | ratio | goal |" % ours["settings"]["reps"])
print("| --- | --- | --- | --- | --- |")
for label, key, scale, unit, goal in ROWS:
    a, b = median(ours, key), median(lesson, key)
    if a is None or b is None:
        continue
    ratio = a / b if b else float("nan")
    g = "" if goal is None else ("<= %.2fx %s" % (goal, "met" if ratio <= goal else "MISSED"))
    print("| %s | %.2f %s | %.2f %s | %.2fx | %s |" % (label, a * scale, unit, b * scale, unit, ratio, g))
floor = ours.get("floor_harness_broker_harness") or {}
if floor:
    p50 = median(ours, "oneway_publish_to_switch.p50_us")
    print("| harness floor (harness -> broker -> harness), p50 / p99 | %.0f / %.0f µs | | %.2fx of floor (p50) | <= 1.3x |"
          % (floor["p50_us"], floor["p99_us"], p50 / floor["p50_us"]))
yardstick = peers.get("floor")
if yardstick:
    a, b = median(yardstick, "fast_cpu_s_per_1000_msgs"), median(lesson, "fast_cpu_s_per_1000_msgs")
    print("| CPU floor: blocking QoS 1 loop, no runtime (examples/bench_floor.rs), per 1000 readings "
          "| %.2f ms | %.2f ms | %.2fx | |" % (a * 1000, b * 1000, a / b))
print()
print("Machine: %s, %s, %s CPUs; %s; harness settings: %s" % (
    platform.node() or "?", platform.machine(), __import__("os").cpu_count(),
    ours.get("version", "").strip(), json.dumps(ours["settings"])))
