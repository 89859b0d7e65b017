// Drives the page served by `gigapath serve` at `/` in headless Chromium, the way a person would:
// a report search, then a slide search, opens the first slide, waits for its zero-shot panel,
// draws a prompt heatmap, and writes screenshots. Prints one JSON object on stdout with what it
// saw; tests/browser_page.rs asserts on it. Every request that does not go to the server is
// blocked and recorded (the page must work offline).
//
//   node tests/browser/page.mjs URL OUTDIR [--query TEXT] [--heatmap-prompt TEXT]
//
// Environment: CHROMIUM (default /usr/bin/chromium). Exit status 0 when the walk-through
// completed (the caller checks the facts), 1 when a step failed (the JSON then has `error` and a
// screenshot `failure.png` is written), 2 on bad usage / no browser.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  if (i < 0) return dflt;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
};
const query = opt("--query", "clear cell renal cell carcinoma");
const heatPrompt = opt("--heatmap-prompt", "papillary architecture");
if (args.length !== 2) {
  console.error("usage: node tests/browser/page.mjs URL OUTDIR [--query TEXT] [--heatmap-prompt TEXT]");
  process.exit(2);
}
const [base, outDir] = args;
mkdirSync(outDir, { recursive: true });
const origin = new URL(base).origin;
const STEP_MS = 60_000;

const out = {
  url: base,
  query,
  steps: [],
  blocked_requests: [],
  failed_requests: [],
  http_errors: [],
  console_errors: [],
  page_errors: [],
  screenshots: [],
};
const step = (name) => {
  out.steps.push(name);
  console.error(`page: ${name}`);
};

let browser;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
} catch (e) {
  out.error = `cannot start chromium: ${e.message}`;
  console.log(JSON.stringify(out));
  process.exit(2);
}

const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
// Offline: only the server itself may be reached.
await context.route("**/*", (route) => {
  const u = route.request().url();
  if (u.startsWith(origin + "/") || u === origin) return route.continue();
  out.blocked_requests.push(u);
  return route.abort("blockedbyclient");
});
const page = await context.newPage();
// A Content-Security-Policy violation is a console error too (the page must run under its policy).
await page.addInitScript(() => {
  document.addEventListener("securitypolicyviolation", (e) =>
    console.error(`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI || "inline"}`));
});
page.setDefaultTimeout(STEP_MS);
page.on("console", (m) => {
  if (m.type() === "error") out.console_errors.push(m.text());
});
page.on("pageerror", (e) => out.page_errors.push(String(e)));
page.on("requestfailed", (r) => {
  if (!out.blocked_requests.includes(r.url())) {
    out.failed_requests.push(`${r.method()} ${r.url()}: ${r.failure()?.errorText}`);
  }
});
page.on("response", (r) => {
  if (r.status() >= 400) out.http_errors.push(`${r.status()} ${r.request().method()} ${r.url()}`);
});

async function shot(name, target = page) {
  const file = join(outDir, name);
  await target.screenshot({ path: file, ...(target === page ? { fullPage: true } : {}) });
  out.screenshots.push(file);
}

/// Scrolls every <img> under `selector` into view (they load lazily), waits until each has
/// finished loading, and returns [{src, naturalWidth, naturalHeight}].
async function loadedImages(selector) {
  const imgs = page.locator(selector);
  const n = await imgs.count();
  for (let i = 0; i < n; i++) {
    const img = imgs.nth(i);
    await img.scrollIntoViewIfNeeded();
    await img.evaluate(
      (el) => el.complete || new Promise((ok) => { el.onload = el.onerror = ok; }),
    );
  }
  await page.evaluate(() => window.scrollTo(0, 0));
  return imgs.evaluateAll((els) =>
    els.map((el) => ({ src: el.getAttribute("src"), naturalWidth: el.naturalWidth, naturalHeight: el.naturalHeight })),
  );
}

async function search(mode, text) {
  await page.selectOption("#mode", mode);
  await page.fill("#q", text);
  const resp = page.waitForResponse((r) => r.url().endsWith(`/v1/search/${mode}`));
  await page.click("#search button[type=submit]");
  const api = await (await resp).json();
  // The page has rendered the answer once "Searching…" is gone.
  await page.waitForFunction(() => !document.querySelector("#results").textContent.includes("Searching"));
  const error = await page.locator("#results .error").allTextContents();
  const cards = await page.locator("#results .result").evaluateAll((els) =>
    els.map((el) => ({
      slide: el.dataset.slide,
      title: el.querySelector("b")?.textContent,
      score: el.querySelector(".score")?.textContent,
      labels: [...el.querySelectorAll(".labels span")].map((s) => s.textContent),
      report: el.querySelector(".report")?.textContent.slice(0, 120) ?? null,
    })),
  );
  return { api_results: (api.results || []).length, cards, error: error.join(" ") || null };
}

try {
  step("open /");
  const res = await page.goto(base, { waitUntil: "load" });
  out.index_status = res.status();
  out.index_csp = res.headers()["content-security-policy"] ?? null;
  out.title = await page.title();

  step("report search");
  out.reports = await search("reports", query);

  step("slide search");
  out.slides = await search("slides", query);
  out.thumbnails = await loadedImages("#results .result img");
  await shot("results.png");
  if (!out.slides.cards.length) throw new Error(`no slide results: ${out.slides.error ?? "empty"}`);

  step("open the first slide");
  const first = out.slides.cards[0].slide;
  const zsResp = page.waitForResponse((r) => r.url().endsWith("/v1/zero-shot/subtype"));
  await page.click(`#results .result[data-slide="${first}"]`);
  await page.waitForSelector("#slide-title");
  out.slide = {
    id: first,
    title: await page.textContent("#slide-title"),
    labels: await page.locator("#slide .labels span").allTextContents(),
    prompt_set: await page.inputValue("#pset"),
    prompt_sets: await page.locator("#pset option").evaluateAll((os) => os.map((o) => o.value)),
  };
  out.overlay = (await loadedImages("#overlay"))[0];

  step("zero-shot panel");
  const zs = await (await zsResp).json();
  await page.waitForFunction(() => {
    const z = document.querySelector("#zeroshot");
    return z && (z.querySelector("#predicted") || z.querySelector(".error"));
  });
  out.zero_shot = {
    error: (await page.locator("#zeroshot .error").allTextContents()).join(" ") || null,
    predicted: await page.locator("#predicted").textContent({ timeout: 1000 }).catch(() => null),
    rows: await page.locator("#zeroshot table.probs tr").evaluateAll((trs) =>
      trs.map((tr) => {
        const td = tr.querySelectorAll("td");
        return { label: td[0]?.textContent, percent: parseFloat(td[2]?.textContent) };
      }),
    ),
    api: zs.results ? { ...zs.results[0], ensemble: zs.ensemble } : zs,
  };

  if (await page.locator("#hm").count()) {
    step("heatmap");
    await page.fill("#hq", heatPrompt);
    await page.click("#hm");
    await page.waitForFunction(() => {
      const m = document.querySelector("#hmsg");
      return m && (m.textContent.includes("similarity") || m.querySelector(".error"));
    });
    out.heatmap = await page.evaluate(() => {
      const c = document.querySelector("#heat");
      const px = c.width && c.height ? c.getContext("2d").getImageData(0, 0, c.width, c.height).data : [];
      let painted = 0;
      for (let i = 3; i < px.length; i += 4) if (px[i] > 0) painted++;
      return {
        message: document.querySelector("#hmsg").textContent,
        canvas: [c.width, c.height],
        painted_pixels: painted,
        pixels: px.length / 4,
      };
    });
  }

  step("screenshots");
  await shot("page.png");
  await shot("slide.png", page.locator("#slide"));
} catch (e) {
  out.error = `${out.steps.at(-1)}: ${e.message.split("\n")[0]}`;
  await shot("failure.png").catch(() => {});
}
await browser.close();
console.log(JSON.stringify(out));
process.exit(out.error ? 1 : 0);
