"""The lesson's nightlight device, written again from the lesson's description, for the benchmark.

IoT for Beginners, lesson 4 ("Connect your device to the Internet"), has the virtual device:
connect to the broker with paho-mqtt and start its network thread; subscribe to `<id>/commands`
and switch the LED on `{"led_on": true}` and off on `{"led_on": false}`; every 5 seconds read the
light sensor and publish `{"light": n}` to `<id>/telemetry`. This program does that and nothing
more (QoS 0 both ways, no queue, no reconnect logic), so it costs what the lesson's device costs.

What the benchmark needs on top:
  - settings from the harness's environment (NIGHTLIGHT_ID, NIGHTLIGHT_BROKER_HOST,
    NIGHTLIGHT_BROKER_PORT, NIGHTLIGHT_INTERVAL_MS; the lesson hard-codes its broker and 5 s);
  - a stand-in light sensor that cycles through a few levels, and a stand-in LED that prints
    `led on|off <CLOCK_MONOTONIC ns>` the moment it switches (the harness times commands by it);
  - stdout flushed at every line, as on the lesson's terminal.
"""

import json
import os
import sys
import time

import paho.mqtt.client as mqtt

sys.stdout.reconfigure(line_buffering=True)

device_id = os.environ.get("NIGHTLIGHT_ID", "nightlight-lesson")
host = os.environ.get("NIGHTLIGHT_BROKER_HOST", "127.0.0.1")
port = int(os.environ.get("NIGHTLIGHT_BROKER_PORT", "1883"))
interval = int(os.environ.get("NIGHTLIGHT_INTERVAL_MS", "5000")) / 1000.0

telemetry_topic = device_id + "/telemetry"
command_topic = device_id + "/commands"

levels = [0, 250, 500, 750, 1000]
reading = 0


def read_light():
    """The stand-in for the Grove light sensor on A0."""
    global reading
    level = levels[reading % len(levels)]
    reading += 1
    return level


def set_led(on):
    """The stand-in for the Grove LED on D5: prints when it switched."""
    print(f"led {'on' if on else 'off'} {time.monotonic_ns()}", flush=True)


def on_command(client, userdata, message):
    command = json.loads(message.payload.decode())
    print("Command received:", command)
    set_led(bool(command["led_on"]))


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, device_id + "-lesson")
client.on_message = on_command
client.connect(host, port)
client.loop_start()
client.subscribe(command_topic)
print("MQTT connected!")

while True:
    light = read_light()
    print("Light level:", light)
    client.publish(telemetry_topic, json.dumps({"light": light}))
    time.sleep(interval)
