// The demo's page in a real browser: Debian's chromium, headless, driven by playwright-core.
// Run by tests/web/run.sh, which installs both and builds the binary; it passes:
//   NIGHTLIGHT_BIN   the nightlight binary (virtual build)
//   WEB_TEST_DIR     where node_modules/playwright-core is, and where the screenshot goes
//   CHROMIUM         the browser
// Each test starts its own `nightlight demo` on free loopback ports and stops it.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createRequire } from "node:module";
import net from "node:net";
import path from "node:path";

const require = createRequire(path.join(process.env.WEB_TEST_DIR, "node_modules", "/"));
const { chromium } = require("playwright-core");
const BIN = process.env.NIGHTLIGHT_BIN;

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// Starts the demo; resolves with its page's address (printed on its first line) and a stop().
async function startDemo() {
  const demo = spawn(BIN, ["demo", "--port", String(await freePort()), "--web-port", "0"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let out = "";
  demo.stderr.on("data", (d) => { out += d; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no address printed: " + out)), 15000);
    demo.stdout.on("data", (d) => {
      out += d;
      const m = /open (http:\/\/127\.0\.0\.1:\d+\/)/.exec(out);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    demo.once("exit", (code) => reject(new Error(`demo exited ${code}: ${out}`)));
  });
  const stop = () => new Promise((resolve) => {
    if (demo.exitCode !== null) return resolve(demo.exitCode);
    demo.once("exit", (code) => resolve(code));
    demo.kill("SIGINT");
  });
  return { url, stop };
}

// A page on a fresh demo, with every console error and page error collected.
async function withPage(fn) {
  const demo = await startDemo();
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: ["--no-sandbox"] });
  const errors = [];
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 760 } });
    page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
    page.on("pageerror", (e) => errors.push(String(e)));
    await page.goto(demo.url);
    await fn(page);
    assert.deepEqual(errors, [], "the page logged errors");
  } finally {
    await browser.close();
    assert.equal(await demo.stop(), 0, "the demo stops cleanly on SIGINT");
  }
}

const text = (page, role, name) => page.getByRole(role, { name, exact: true }).textContent();

// Waits until fn() returns something truthy; fails with what it saw last.
async function until(what, fn, ms = 20000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    last = await fn();
    if (last) return last;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.fail(`${what}: still ${JSON.stringify(last)} after ${ms} ms`);
}

test("the page names the device and draws its readings as they arrive", async () => {
  await withPage(async (page) => {
    await until("the heading names the device", async () =>
      (await page.getByRole("heading", { level: 1 }).textContent()).includes("demo"));
    const chart = page.getByRole("img", { name: "Light chart" });
    const before = await chart.evaluate((c) => c.toDataURL());
    await until("the chart changes as readings arrive", async () =>
      (await chart.evaluate((c) => c.toDataURL())) !== before);
    await until("the connection is online", async () => (await text(page, "status", "Connection")) === "online");
    await page.screenshot({ path: path.join(process.env.WEB_TEST_DIR, "demo-page.png") });
  });
});

// The simulated day (12 s) turns the LED on and off by itself: what the slider holds must hold,
// reading after reading, for longer than the day would.
async function holds(page, light, led) {
  await until(`readings at ${light}`, async () => (await page.locator("#level-value").textContent()) === String(light));
  await until(`LED ${led} at ${light}`, async () => (await text(page, "status", "LED")) === led);
  for (let i = 0; i < 28; i++) {
    assert.equal(await page.locator("#level-value").textContent(), String(light), "the reading holds");
    assert.equal(await text(page, "status", "LED"), led, `the LED stays ${led}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

test("the light level slider at 50 turns the LED on through the controller, at 900 off", async () => {
  await withPage(async (page) => {
    const slider = page.getByRole("slider", { name: "Light level" });
    await slider.fill("900");
    await holds(page, 900, "off");
    const commandsBefore = Number(await page.locator("#commands").textContent());
    await slider.fill("50");
    await holds(page, 50, "on");
    await slider.fill("900");
    await holds(page, 900, "off");
    const commands = Number(await page.locator("#commands").textContent());
    assert.equal(commands, commandsBefore + 2, "one command per change, listed");
    await page.getByRole("button", { name: "Follow the day" }).click();
    await until("back to the day", async () => (await page.locator("#mode").textContent()).includes("day"));
  });
});

test("the network switch grows the queue while the link is cut, and it drains to 0 after", async () => {
  await withPage(async (page) => {
    const network = page.getByRole("switch", { name: "Network" });
    await until("online first", async () => (await text(page, "status", "Connection")) === "online");
    assert.equal(await network.getAttribute("aria-checked"), "true");
    await network.click();
    await until("the switch says cut", async () => (await network.getAttribute("aria-checked")) === "false");
    await until("the broker sees the device go (its Last Will)", async () =>
      (await text(page, "status", "Connection")) === "offline");
    const queued = await until("readings queue up", async () => {
      const n = Number(await text(page, "status", "Queue"));
      return n >= 10 && n;
    });
    assert.ok(queued >= 10);
    await network.click();
    await until("the switch says on", async () => (await network.getAttribute("aria-checked")) === "true");
    await until("the queue drains to 0", async () => (await text(page, "status", "Queue")) === "0");
    await until("online again", async () => (await text(page, "status", "Connection")) === "online");
  });
});
