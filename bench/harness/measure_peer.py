#!/usr/bin/env python3
"""Measure a nightlight device peer (any program) against a local mosquitto.

    python measure_peer.py --name paho-lesson -- python peers/lesson_device.py

The peer is started once per phase, with its settings in the environment and in
placeholders of its command line:

    NIGHTLIGHT_ID            {id}            device id (topics <id>/telemetry, <id>/commands)
    NIGHTLIGHT_BROKER_HOST   {host}          127.0.0.1
    NIGHTLIGHT_BROKER_PORT   {port}          18830
    NIGHTLIGHT_INTERVAL_MS   {interval_ms}   telemetry publish interval (also {interval_s})

It is "ready" when the harness receives its first telemetry message. The LED is observed
through one or more of:

  * stamp lines (default): the peer prints, on stdout or stderr, one line per switch
        led on 123456789012        led off 123456789999
    the number being CLOCK_MONOTONIC in ns at the moment of the switch (an optional 4th
    word `realtime` says it is CLOCK_REALTIME ns since the epoch instead). This gives the
    one-way latency: command publish -> LED switched.
  * --led-regex-on/--led-regex-off: lines on stdout/stderr, timed when the harness reads them.
  * --led-state-topic: a state message the peer publishes after switching (round trip).

Phases, per repetition (--reps):
  default  interval --default-interval-ms (5000): startup, RSS/HWM at ready+10 s, CPU over a
           20 s idle window, then --commands (500) alternating on/off commands at QoS 1,
           one at a time (next one after the previous switch was observed).
  fast     interval --fast-interval-ms (10): startup, then CPU per --fast-messages (1000)
           telemetry messages received, after a 20 message warm-up.

CPU is read from /proc/<pid>/stat (utime+stime, process-wide, 10 ms ticks) and, more finely,
from /proc/<pid>/task/*/schedstat (ns on CPU of the live threads). Memory from
/proc/<pid>/status VmRSS / VmHWM. All of these are summed over the peer's process tree
(a wrapper script should `exec` the real program so the tree is one process).

Results: a table on stdout and JSON merged into results/peers-<date>.json under the peer's name.
"""

import argparse
import datetime as dt
import json
import os
import platform
import queue
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata

BENCH = os.path.dirname(os.path.abspath(__file__))
try:
    import paho.mqtt.client as mqtt
except ImportError:  # run with the bench venv's python if paho is not importable here
    venv_py = os.path.join(BENCH, ".venv", "bin", "python")
    if os.path.exists(venv_py) and os.path.realpath(sys.prefix) != os.path.join(BENCH, ".venv"):
        os.execv(venv_py, [venv_py] + sys.argv)
    raise SystemExit("paho-mqtt missing: run bench/compare.sh, which makes the venv")

CLK_TCK = os.sysconf("SC_CLK_TCK")
STAMP_RE = re.compile(rb"^\s*led\s+(on|off)\s+(\d+)(?:\s+(monotonic|realtime))?\s*$")


def subst(text, fmt):
    """Replace {key} placeholders (only known keys; other braces, e.g. JSON, stay)."""
    for k, v in fmt.items():
        text = text.replace("{" + k + "}", str(v))
    return text


def now_ns():
    return time.monotonic_ns()  # CLOCK_MONOTONIC on Linux


def log(msg):
    print(f"[measure {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc sampling

def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(b")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree_pids(root):
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def sample(root):
    """CPU and memory of root's process tree."""
    cpu_ticks = 0
    sched_ns = 0
    rss_kb = hwm_kb = threads = 0
    pids = tree_pids(root)
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                s = f.read()
            fields = s[s.rindex(b")") + 2:].split()
            cpu_ticks += int(fields[11]) + int(fields[12])  # utime, stime
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss_kb += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm_kb += int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads += int(line.split()[1])
            for t in os.listdir(f"/proc/{p}/task"):
                try:
                    with open(f"/proc/{p}/task/{t}/schedstat") as f:
                        sched_ns += int(f.read().split()[0])
                except OSError:
                    pass
        except (OSError, ValueError, IndexError):
            continue
    return {"t_ns": now_ns(), "cpu_s": cpu_ticks / CLK_TCK, "sched_s": sched_ns / 1e9,
            "rss_kb": rss_kb, "hwm_kb": hwm_kb, "threads": threads, "pids": len(pids)}


def cpu_delta(a, b):
    return {"cpu_s": round(b["cpu_s"] - a["cpu_s"], 4),
            "sched_s": round(b["sched_s"] - a["sched_s"], 6),
            "wall_s": round((b["t_ns"] - a["t_ns"]) / 1e9, 3)}


# ---------------------------------------------------------------- statistics

def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


def lat_stats(samples_ns):
    v = sorted(samples_ns)
    if not v:
        return None
    us = lambda x: round(x / 1000.0, 1)
    return {"n": len(v), "p50_us": us(pct(v, 50)), "p99_us": us(pct(v, 99)),
            "max_us": us(v[-1]), "min_us": us(v[0]), "mean_us": us(sum(v) / len(v))}


def mmm(vals):
    vals = [x for x in vals if x is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


# ---------------------------------------------------------------- broker

def port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def spawn_broker(host, port, rundir):
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(BENCH, "mosquitto.conf")) as f:
        conf = f.read()
    conf = re.sub(r"(?m)^listener\s+\d+\s+\S+", f"listener {port} {host}", conf)
    path = os.path.join(rundir, f"mosquitto.{port}.conf")
    with open(path, "w") as f:
        f.write(conf)
    logf = open(os.path.join(rundir, f"mosquitto.{port}.log"), "ab")
    proc = subprocess.Popen(["mosquitto", "-c", path], stdout=logf, stderr=subprocess.STDOUT)
    for _ in range(100):
        if port_open(host, port):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"mosquitto did not start on {host}:{port}; see {logf.name}")


# ---------------------------------------------------------------- MQTT side of the harness

class Watcher:
    """Subscriber (own network thread): telemetry topic and optional LED state topic."""

    def __init__(self, host, port, telemetry_topic, state_topic, state_on, state_off):
        self.telemetry_topic = telemetry_topic
        self.state_topic = state_topic
        self.state_map = {state_on.encode(): "on", state_off.encode(): "off"}
        self.cv = threading.Condition()
        self.telemetry = []  # (recv_ns, payload)
        self.state_q = queue.Queue()
        self.floor_q = queue.Queue()
        self.floor_topic = None
        self.subscribed = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, f"bench-watch-{os.getpid()}")
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *a: self.subscribed.set()
        c.on_message = self._on_message
        self.c = c
        c.connect(host, port, keepalive=30)
        nodelay(c)
        c.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("harness subscriber could not subscribe")

    def _on_connect(self, client, userdata, flags, rc, props):
        topics = [(self.telemetry_topic, 0)]
        if self.state_topic:
            topics.append((self.state_topic, 0))
        if self.floor_topic:
            topics.append((self.floor_topic, 1))
        client.subscribe(topics)

    def add_floor_topic(self, topic):
        self.floor_topic = topic
        self.subscribed.clear()
        self.c.subscribe(topic, 1)
        self.subscribed.wait(10)

    def _on_message(self, client, userdata, msg):
        t = now_ns()
        if msg.topic == self.telemetry_topic:
            with self.cv:
                self.telemetry.append((t, msg.payload))
                self.cv.notify_all()
        elif self.state_topic and msg.topic == self.state_topic:
            st = self.state_map.get(msg.payload.strip())
            if st:
                self.state_q.put((st, t))
        elif msg.topic == self.floor_topic:
            self.floor_q.put((msg.payload, t))

    def reset(self):
        with self.cv:
            self.telemetry = []
        drain(self.state_q)

    def wait_telemetry(self, count, deadline_ns, alive=lambda: True):
        with self.cv:
            while len(self.telemetry) < count:
                left = (deadline_ns - now_ns()) / 1e9
                if left <= 0 or not alive():
                    return None
                self.cv.wait(min(left, 0.2))
            return self.telemetry[count - 1]

    def count(self):
        with self.cv:
            return len(self.telemetry)

    def stop(self):
        self.c.loop_stop()
        self.c.disconnect()


class Publisher:
    """Command publisher with no network thread: publish() writes the packet to the socket
    in the calling thread, so the timestamp taken just before it is the send time."""

    def __init__(self, host, port):
        self.connected = False
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, f"bench-pub-{os.getpid()}-{now_ns()}")
        c.max_inflight_messages_set(0)  # unlimited: PUBACKs are read lazily
        c.on_connect = self._on_connect
        c.connect(host, port, keepalive=60)
        nodelay(c)
        end = time.monotonic() + 10
        while not self.connected and time.monotonic() < end:
            c.loop(0.05)
        if not self.connected:
            raise SystemExit("command publisher could not connect")
        self.c = c

    def _on_connect(self, *a):
        self.connected = True

    def publish(self, topic, payload, qos):
        mono, rt = now_ns(), time.time_ns()
        info = self.c.publish(topic, payload, qos=qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish failed rc={info.rc}")
        return mono, rt

    def pump(self):
        self.c.loop(0)

    def close(self):
        for _ in range(20):
            self.c.loop(0.01)
        self.c.disconnect()


def nodelay(client):
    """TCP_NODELAY on the harness's own sockets, so the harness adds no Nagle stalls."""
    sock = client.socket()
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def drain(q):
    n = 0
    while True:
        try:
            q.get_nowait()
            n += 1
        except queue.Empty:
            return n


# ---------------------------------------------------------------- the peer process

class Peer:
    def __init__(self, argv, env, logpath, regex_on, regex_off):
        self.stamp_q = queue.Queue()
        self.regex_q = queue.Queue()
        self.regex_on = re.compile(regex_on.encode()) if regex_on else None
        self.regex_off = re.compile(regex_off.encode()) if regex_off else None
        self.logf = open(logpath, "wb")
        self.lock = threading.Lock()
        self.t_start = now_ns()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.threads = [threading.Thread(target=self._reader, args=(s, tag), daemon=True)
                        for s, tag in ((self.proc.stdout, b"O "), (self.proc.stderr, b"E "))]
        for t in self.threads:
            t.start()

    def _reader(self, stream, tag):
        for line in iter(stream.readline, b""):
            seen = now_ns()
            m = STAMP_RE.match(line)
            if m:
                self.stamp_q.put((m.group(1).decode(), int(m.group(2)),
                                  (m.group(3) or b"monotonic").decode(), seen))
            else:
                if self.regex_on and self.regex_on.search(line):
                    self.regex_q.put(("on", seen))
                elif self.regex_off and self.regex_off.search(line):
                    self.regex_q.put(("off", seen))
            with self.lock:
                self.logf.write(b"%d " % seen + tag + line)

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        rc = self.proc.poll()
        if rc is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)  # our own session: pgid == pid
            except ProcessLookupError:
                pass
            try:
                rc = self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                rc = self.proc.wait(5)
        for t in self.threads:
            t.join(2)
        with self.lock:
            self.logf.close()
        return rc


# ---------------------------------------------------------------- phases

class Bench:
    def __init__(self, a):
        self.a = a
        self.rundir = os.path.join(BENCH, "run")
        os.makedirs(self.rundir, exist_ok=True)
        fmt = dict(id=a.id, host=a.host, port=a.port)
        self.telemetry_topic = subst(a.telemetry_topic, fmt)
        self.command_topic = subst(a.command_topic, fmt)
        self.state_topic = subst(a.led_state_topic, fmt) if a.led_state_topic else None
        self.raw = {}  # latency samples pooled over repetitions
        self.observers = []
        if a.led_stamp:
            self.observers.append("stamp")
        if a.led_regex_on:
            self.observers.append("regex")
        if self.state_topic:
            self.observers.append("state")
        if not self.observers:
            log("no LED observation configured: command latency will be skipped")
        self.watch = Watcher(a.host, a.port, self.telemetry_topic, self.state_topic,
                             a.led_state_on, a.led_state_off)

    def start_peer(self, phase, rep, interval_ms):
        a = self.a
        fmt = dict(id=a.id, host=a.host, port=a.port, interval_ms=interval_ms,
                   interval_s=f"{interval_ms / 1000:g}", bench=BENCH)
        argv = [subst(x, fmt) for x in a.cmd]
        env = dict(os.environ)
        env.update(NIGHTLIGHT_ID=a.id, NIGHTLIGHT_BROKER_HOST=a.host,
                   NIGHTLIGHT_BROKER_PORT=str(a.port), NIGHTLIGHT_INTERVAL_MS=str(interval_ms))
        for kv in a.env:
            k, _, v = kv.partition("=")
            env[k] = subst(v, fmt)
        self.watch.reset()
        logpath = os.path.join(self.rundir, f"{a.name}.rep{rep}.{phase}.log")
        peer = Peer(argv, env, logpath, a.led_regex_on, a.led_regex_off)
        first = self.watch.wait_telemetry(1, peer.t_start + int(a.ready_timeout_s * 1e9), peer.alive)
        if first is None:
            rc = peer.stop()
            raise SystemExit(f"peer not ready (no telemetry on {self.telemetry_topic}) "
                             f"within {a.ready_timeout_s}s, rc={rc}; see {logpath}")
        startup_ms = (first[0] - peer.t_start) / 1e6
        return peer, first, startup_ms, logpath

    def sleep_until(self, t_ns, peer):
        while now_ns() < t_ns:
            if not peer.alive():
                raise SystemExit("peer exited early")
            time.sleep(min(0.2, max(0.0, (t_ns - now_ns()) / 1e9)))

    def phase_default(self, rep):
        a = self.a
        peer, first, startup_ms, logpath = self.start_peer("default", rep, a.default_interval_ms)
        payload = first[1]
        try:
            json_ok = isinstance(json.loads(payload), dict) and "light" in json.loads(payload)
        except ValueError:
            json_ok = False
        log(f"rep {rep} default: ready after {startup_ms:.1f} ms, first telemetry {payload!r}")
        ready = first[0]
        self.sleep_until(ready + int(a.rss_after_s * 1e9), peer)
        s_rss = sample(peer.pid)
        n0 = self.watch.count()
        self.sleep_until(s_rss["t_ns"] + int(a.idle_window_s * 1e9), peer)
        s_idle = sample(peer.pid)
        idle = cpu_delta(s_rss, s_idle)
        idle["telemetry_msgs"] = self.watch.count() - n0
        idle["cpu_pct"] = round(100 * idle["sched_s"] / idle["wall_s"], 3)
        log(f"rep {rep} default: RSS {s_rss['rss_kb']} kB, HWM {s_rss['hwm_kb']} kB, "
            f"idle {idle['sched_s']:.4f} CPU-s over {idle['wall_s']} s")
        lat = None
        s_after = s_idle
        if self.observers and a.commands > 0:
            lat, s_after = self.latency(peer, rep)
        rc = peer.stop()
        return {"startup_ms": round(startup_ms, 1), "first_payload": payload.decode("utf8", "replace"),
                "telemetry_is_json_light": json_ok,
                "mem_at_ready_plus_s": a.rss_after_s, "rss_kb": s_rss["rss_kb"], "hwm_kb": s_rss["hwm_kb"],
                "threads": s_rss["threads"], "pids": s_rss["pids"],
                "idle": idle, "latency": lat,
                "rss_kb_end": s_after["rss_kb"], "hwm_kb_end": s_after["hwm_kb"],
                "exit_rc": rc, "log": os.path.relpath(logpath, BENCH)}

    def latency(self, peer, rep):
        a = self.a
        pub = Publisher(a.host, a.port)
        queues = {"stamp": peer.stamp_q, "regex": peer.regex_q, "state": self.watch.state_q}
        qos = a.cmd_qos

        def one(state):
            for q in queues.values():
                drain(q)
            mono, rt = pub.publish(self.command_topic, a.cmd_on if state == "on" else a.cmd_off, qos)
            got = {}
            deadline = mono + int(a.cmd_timeout_s * 1e9)
            for obs in self.observers:
                q = queues[obs]
                while True:
                    left = (deadline - now_ns()) / 1e9
                    if left <= 0:
                        break
                    try:
                        item = q.get(timeout=left)
                    except queue.Empty:
                        break
                    if item[0] != state:
                        continue
                    if obs == "stamp":
                        _, ns, clock, seen = item
                        base = rt if clock == "realtime" else mono
                        if ns < base:
                            continue  # stale line from before this command
                        got["stamp"] = ns - base
                        got["stamp_seen"] = seen - mono
                    else:
                        if item[1] < mono:
                            continue
                        got[obs] = item[1] - mono
                    break
            pub.pump()
            return got

        # warm-up: make sure the subscription is live and the LED is in a known state
        state = "on"
        streak = 0
        for _ in range(a.warmup_commands + 20):
            got = one(state)
            state = "off" if state == "on" else "on"
            streak = streak + 1 if all(o in got for o in self.observers) else 0
            if streak >= a.warmup_commands:
                break
            time.sleep(0.05)
        if streak < a.warmup_commands:
            pub.close()
            log(f"rep {rep}: LED switch never observed ({self.observers}); latency skipped")
            return {"error": "LED switch never observed"}, sample(peer.pid)

        samples = {k: [] for k in ("stamp", "stamp_seen", "regex", "state")}
        lost = 0
        s0 = sample(peer.pid)
        for _ in range(a.commands):
            got = one(state)
            state = "off" if state == "on" else "on"
            if not all(o in got for o in self.observers):
                lost += 1
            for k, v in got.items():
                samples[k].append(v)
            if a.cmd_gap_ms:
                time.sleep(a.cmd_gap_ms / 1000.0)
        s1 = sample(peer.pid)
        pub.close()
        out = {"commands": a.commands, "qos": qos, "lost_or_timed_out": lost,
               "cpu_during_commands": cpu_delta(s0, s1)}
        names = {"stamp": "oneway_publish_to_switch",
                 "stamp_seen": "publish_to_stamp_line_read",
                 "regex": "publish_to_matching_line_read",
                 "state": "roundtrip_publish_to_state_msg"}
        for k, v in samples.items():
            if v:
                out[names[k]] = lat_stats(v)
                self.raw.setdefault(names[k], []).extend(v)
                if a.keep_raw:
                    out[names[k] + "_raw_ns"] = v
        st = out.get(names[self.observers[0]])
        log(f"rep {rep} latency ({names[self.observers[0]]}): {st}")
        return out, s1

    def phase_fast(self, rep):
        a = self.a
        peer, first, startup_ms, logpath = self.start_peer("fast", rep, a.fast_interval_ms)
        w = a.fast_warmup
        n = a.fast_messages
        limit = now_ns() + int((a.ready_timeout_s + n * a.fast_interval_ms / 1000.0 * 5 + 30) * 1e9)
        m0 = self.watch.wait_telemetry(1 + w, limit, peer.alive)
        s0 = sample(peer.pid)
        m1 = self.watch.wait_telemetry(1 + w + n, limit, peer.alive) if m0 else None
        s1 = sample(peer.pid)
        rc = peer.stop()
        if not m1:
            return {"startup_ms": round(startup_ms, 1), "error": "not enough telemetry",
                    "received": self.watch.count(), "exit_rc": rc}
        d = cpu_delta(s0, s1)
        span_s = (m1[0] - m0[0]) / 1e9
        with self.watch.cv:
            ts = [t for t, _ in self.watch.telemetry[w:w + n + 1]]
        gaps = sorted(ts[i + 1] - ts[i] for i in range(len(ts) - 1))
        res = {"startup_ms": round(startup_ms, 1), "interval_ms": a.fast_interval_ms,
               "messages": n, "span_s": round(span_s, 3),
               "rate_msgs_per_s": round(n / span_s, 1),
               "gap_p50_ms": round(pct(gaps, 50) / 1e6, 3), "gap_p99_ms": round(pct(gaps, 99) / 1e6, 3),
               "cpu_s": d["cpu_s"], "sched_s": d["sched_s"],
               "cpu_s_per_1000_msgs": round(d["sched_s"] * 1000.0 / n, 4),
               "cpu_pct": round(100 * d["sched_s"] / d["wall_s"], 2),
               "rss_kb": s1["rss_kb"], "hwm_kb": s1["hwm_kb"], "threads": s1["threads"],
               "exit_rc": rc, "log": os.path.relpath(logpath, BENCH)}
        log(f"rep {rep} fast: {res['rate_msgs_per_s']} msg/s, {res['cpu_s_per_1000_msgs']} CPU-s/1000 msgs")
        return res

    def floor(self, n):
        """Harness + broker alone: publish -> the harness's own subscriber, no peer."""
        topic = f"{self.a.id}/bench-floor"
        self.watch.add_floor_topic(topic)
        pub = Publisher(self.a.host, self.a.port)
        v = []
        for i in range(n):
            drain(self.watch.floor_q)
            mono, _ = pub.publish(topic, b"%d" % i, 1)
            try:
                _, t = self.watch.floor_q.get(timeout=2)
                v.append(t - mono)
            except queue.Empty:
                pass
            pub.pump()
            if self.a.cmd_gap_ms:
                time.sleep(self.a.cmd_gap_ms / 1000.0)
        pub.close()
        return lat_stats(v)


# ---------------------------------------------------------------- reporting

def environment():
    def ver(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        mosq = None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    sysver = subprocess.run(["python3", "--version"], capture_output=True, text=True).stdout.strip()
    return {"harness_python": platform.python_version(), "system_python3": sysver,
            "paho_mqtt": ver("paho-mqtt"), "mqtt_io": ver("mqtt-io"), "aiomqtt": ver("aiomqtt"),
            "mosquitto": mosq, "kernel": platform.release(), "cpu": cpu, "nproc": os.cpu_count()}


def summarize(reps):
    def col(path):
        out = []
        for r in reps:
            x = r
            for p in path:
                x = x.get(p) if isinstance(x, dict) else None
            out.append(x)
        return out

    S = {}
    S["startup_ms"] = mmm(col(["default", "startup_ms"]) + col(["fast", "startup_ms"]))
    S["rss_kb"] = mmm(col(["default", "rss_kb"]))
    S["hwm_kb"] = mmm(col(["default", "hwm_kb"]))
    S["hwm_kb_end"] = mmm(col(["default", "hwm_kb_end"]))
    S["idle_cpu_s_per_window"] = mmm(col(["default", "idle", "sched_s"]))
    S["idle_cpu_pct"] = mmm(col(["default", "idle", "cpu_pct"]))
    S["fast_cpu_s_per_1000_msgs"] = mmm(col(["fast", "cpu_s_per_1000_msgs"]))
    S["fast_rate_msgs_per_s"] = mmm(col(["fast", "rate_msgs_per_s"]))
    S["fast_rss_kb"] = mmm(col(["fast", "rss_kb"]))
    for k in ("oneway_publish_to_switch", "publish_to_stamp_line_read",
              "publish_to_matching_line_read", "roundtrip_publish_to_state_msg"):
        for q in ("p50_us", "p99_us", "max_us"):
            c = col(["default", "latency", k, q])
            if any(x is not None for x in c):
                S[f"{k}.{q}"] = mmm(c)
    c = col(["default", "latency", "cpu_during_commands", "sched_s"])
    if any(x is not None for x in c):
        S["cpu_s_per_500_commands"] = mmm(c)
    S["commands_lost"] = mmm(col(["default", "latency", "lost_or_timed_out"]))
    return S


def fmt_num(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:.4g}"
    return str(x)


def show(path):
    """Side-by-side medians of every peer in a results file."""
    with open(path) as fh:
        doc = json.load(fh)
    peers = doc.get("peers", {})
    keys = []
    for p in peers.values():
        for k in p.get("summary", {}):
            if k not in keys:
                keys.append(k)
    names = list(peers)
    w = max([len(k) for k in keys] + [10]) + 2
    cw = max([len(n) for n in names] + [10]) + 2
    print(f"{path}: medians over repetitions")
    print(f"  {'':<{w}}" + "".join(f"{n:>{cw}}" for n in names))
    for k in keys:
        row = []
        for n in names:
            v = peers[n].get("summary", {}).get(k)
            row.append(fmt_num(v["median"]) if v else "-")
        print(f"  {k:<{w}}" + "".join(f"{x:>{cw}}" for x in row))
    print(f"  {'floor p50/p99 us':<{w}}" + "".join(
        f"{(fmt_num(f['p50_us']) + '/' + fmt_num(f['p99_us'])) if f else '-':>{cw}}"
        for f in (peers[n].get("floor_harness_broker_harness") for n in names)))


def print_table(name, S, floor):
    f = fmt_num
    print(f"\n== {name} ==   (min / median / max over repetitions)")
    w = max(len(k) for k in S) + 2
    for k, v in S.items():
        if v is None:
            continue
        print(f"  {k:<{w}} {f(v['min']):>10} {f(v['median']):>10} {f(v['max']):>10}   (n={v['n']})")
    if floor:
        print(f"  {'floor: harness->broker->harness':<{w}} p50 {floor['p50_us']} us, "
              f"p99 {floor['p99_us']} us, max {floor['max_us']} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", help="peer label in the results (default: command basename)")
    ap.add_argument("--id", help="device id (default: bench-<name>)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18830)
    ap.add_argument("--spawn-broker", choices=["auto", "yes", "no"], default="auto",
                    help="auto: start a private mosquitto if nothing listens on host:port")
    ap.add_argument("--telemetry-topic", default="{id}/telemetry")
    ap.add_argument("--command-topic", default="{id}/commands")
    ap.add_argument("--cmd-on", default='{"led_on": true}')
    ap.add_argument("--cmd-off", default='{"led_on": false}')
    ap.add_argument("--cmd-qos", type=int, default=1)
    ap.add_argument("--no-led-stamp", dest="led_stamp", action="store_false",
                    help="do not expect `led <on|off> <ns>` lines")
    ap.add_argument("--led-regex-on", help="regex of a stdout/stderr line meaning LED on (timed at read)")
    ap.add_argument("--led-regex-off")
    ap.add_argument("--led-state-topic", help="topic where the peer reports the LED state (round trip)")
    ap.add_argument("--led-state-on", default="ON")
    ap.add_argument("--led-state-off", default="OFF")
    ap.add_argument("--default-interval-ms", type=int, default=5000)
    ap.add_argument("--fast-interval-ms", type=int, default=10)
    ap.add_argument("--fast-messages", type=int, default=1000)
    ap.add_argument("--fast-warmup", type=int, default=20)
    ap.add_argument("--rss-after-s", type=float, default=10)
    ap.add_argument("--idle-window-s", type=float, default=20)
    ap.add_argument("--commands", type=int, default=500)
    ap.add_argument("--warmup-commands", type=int, default=4)
    ap.add_argument("--cmd-timeout-s", type=float, default=2)
    ap.add_argument("--cmd-gap-ms", type=float, default=2)
    ap.add_argument("--ready-timeout-s", type=float, default=30)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--phases", default="default,fast")
    ap.add_argument("--floor", type=int, default=500, help="messages for the harness floor (0: skip)")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the peer (placeholders ok)")
    ap.add_argument("--version-cmd", help="shell command whose output is recorded as the peer's version")
    ap.add_argument("--note", default="")
    ap.add_argument("--keep-raw", action="store_true", help="keep every latency sample in the JSON")
    ap.add_argument("--out", help="JSON file (default results/peers-<date>.json, merged by --name)")
    ap.add_argument("--show", metavar="JSON", help="only print the peers of a results file side by side")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- peer command line")
    a = ap.parse_args()
    if a.show:
        show(a.show)
        return
    if a.cmd and a.cmd[0] == "--":
        a.cmd = a.cmd[1:]
    if not a.cmd:
        ap.error("give the peer command after --")
    a.name = a.name or os.path.basename(a.cmd[-1] if a.cmd[0].endswith("python") else a.cmd[0])
    a.id = a.id or f"bench-{re.sub(r'[^A-Za-z0-9_-]', '-', a.name)}"
    if bool(a.led_regex_on) != bool(a.led_regex_off):
        ap.error("--led-regex-on and --led-regex-off go together")

    broker = None
    if a.spawn_broker == "yes" or (a.spawn_broker == "auto" and not port_open(a.host, a.port)):
        broker = spawn_broker(a.host, a.port, os.path.join(BENCH, "run"))
        log(f"started private mosquitto pid {broker.pid} on {a.host}:{a.port}")
    elif not port_open(a.host, a.port):
        raise SystemExit(f"no broker on {a.host}:{a.port}")

    try:
        b = Bench(a)
        floor = b.floor(a.floor) if a.floor else None
        if floor:
            log(f"floor (harness->broker->harness, QoS 1): {floor}")
        phases = [p.strip() for p in a.phases.split(",") if p.strip()]
        reps = []
        for rep in range(1, a.reps + 1):
            r = {}
            if "default" in phases:
                r["default"] = b.phase_default(rep)
            if "fast" in phases:
                r["fast"] = b.phase_fast(rep)
            reps.append(r)
        b.watch.stop()
    finally:
        if broker:
            broker.terminate()
            broker.wait(5)

    S = summarize(reps)
    pooled = {k: lat_stats(v) for k, v in b.raw.items()}
    print_table(a.name, S, floor)
    for k, v in pooled.items():
        print(f"  pooled {k}: p50 {v['p50_us']} us, p99 {v['p99_us']} us, max {v['max_us']} us (n={v['n']})")

    version = None
    if a.version_cmd:
        version = subprocess.run(a.version_cmd, shell=True, capture_output=True,
                                 text=True).stdout.strip()
    out = a.out or os.path.join(BENCH, "results", f"peers-{dt.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    doc = {}
    if os.path.exists(out):
        with open(out) as f:
            doc = json.load(f)
    doc.setdefault("peers", {})
    doc["updated"] = dt.datetime.now().isoformat(timespec="seconds")
    doc["environment"] = environment()
    doc["peers"][a.name] = {
        "measured": dt.datetime.now().isoformat(timespec="seconds"),
        "cmd": a.cmd, "id": a.id, "version": version, "note": a.note,
        "topics": {"telemetry": b.telemetry_topic, "command": b.command_topic, "state": b.state_topic},
        "observers": b.observers,
        "settings": {k: getattr(a, k) for k in (
            "default_interval_ms", "fast_interval_ms", "fast_messages", "fast_warmup", "rss_after_s",
            "idle_window_s", "commands", "cmd_qos", "cmd_gap_ms", "cmd_timeout_s", "reps")},
        "floor_harness_broker_harness": floor,
        "summary": S,
        "latency_pooled_over_reps": pooled,
        "reps": reps,
    }
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nresults merged into {os.path.relpath(out, os.getcwd())} under {a.name!r}")


if __name__ == "__main__":
    main()
