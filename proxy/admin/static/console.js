// laneswitch web console: polls the admin API of this origin and draws it (SPEC §10).
//
// Rules this file keeps (the page runs under `Content-Security-Policy: default-src 'self'`):
// - every name, revision, reason and error text goes into the page through textContent or
//   createElement, never innerHTML; no inline style (styles are classes or SVG attributes);
// - every data call goes to a path of this origin and carries the token from sessionStorage as
//   `Authorization: Bearer` (never in a URL, never a cookie: credentials "omit");
// - charts are SVG elements built with DOM calls, no library.
"use strict";

(() => {
  const TOKEN_KEY = "laneswitch.token";
  const MODE_KEY = "laneswitch.mode"; // "operate": show the actions without a token
  const POLL_MS = 1000; // the console updates at least every 2 s (SPEC §10)
  const WINDOW_S = 15 * 60; // the charts' span
  const MAX_EVENTS = 300; // events kept in the page (the timeline shows the newest)
  const TIMELINE_ROWS = 50;
  const INTERVAL_ROWS = 12;
  const RUNNING = new Set(["progressing", "paused", "promoting"]);
  const SVG_NS = "http://www.w3.org/2000/svg";

  const page = {
    status: null,
    events: [],
    lastEventId: 0,
    history: new Map(), // service -> Map(version -> rows)
    cards: new Map(), // service -> the card's live parts
    skew: 0, // server clock minus this browser's, in seconds (from the Date header)
    timer: null,
    polling: false,
    askingToken: false,
  };

  // -- small DOM helpers --------------------------------------------------------------------------

  function el(tag, options, ...children) {
    const node = document.createElement(tag);
    const o = options || {};
    if (o.cls) node.className = o.cls;
    if (o.text !== undefined && o.text !== null) node.textContent = String(o.text);
    for (const [name, value] of Object.entries(o.attrs || {})) node.setAttribute(name, String(value));
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function $(id) {
    return document.getElementById(id);
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "–";
    if (typeof value !== "number") return String(value);
    return Number.isInteger(value) ? String(value) : value.toFixed(digits === undefined ? 1 : digits);
  }

  function clock(unix) {
    return new Date(unix * 1000).toLocaleTimeString([], { hour12: false });
  }

  function now() {
    return Date.now() / 1000 + page.skew;
  }

  function weightsText(value) {
    if (value && typeof value === "object") {
      return Object.entries(value).map(([k, v]) => `${k} ${v}`).join(" · ");
    }
    return value === null || value === undefined ? "" : String(value);
  }

  // -- the admin API -------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message, details) {
      super(message);
      this.status = status;
      this.details = details || [];
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(method, path, body) {
    // Only paths of this origin: the token never goes anywhere else.
    if (!path.startsWith("/") || path.startsWith("//")) throw new Error(`not a local path: ${path}`);
    const headers = { Accept: "application/json" };
    const secret = token();
    if (secret) headers.Authorization = `Bearer ${secret}`;
    const init = { method, headers, credentials: "omit", cache: "no-store", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (exc) {
      throw new ApiError(0, `cannot reach the admin API (${exc.message})`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (exc) {
      data = null;
    }
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date)) page.skew = date / 1000 - Date.now() / 1000;
    if (!response.ok) {
      const message =
        data && typeof data.error === "string" ? data.error : text || `HTTP ${response.status}`;
      const details = data && Array.isArray(data.errors) ? data.errors.map(String) : [];
      const error = new ApiError(response.status, message, details);
      if (response.status === 401) askToken(error.message);
      throw error;
    }
    return data;
  }

  const servicePath = (service) => `/services/${encodeURIComponent(service)}`;

  // -- token and mode ------------------------------------------------------------------------------

  function operating() {
    return Boolean(token()) || sessionStorage.getItem(MODE_KEY) === "operate";
  }

  function askToken(reason) {
    const had = Boolean(token());
    sessionStorage.removeItem(TOKEN_KEY);
    page.askingToken = true;
    $("login").hidden = false;
    $("services").hidden = true;
    $("fleet").hidden = true;
    $("login-error").textContent = had ? `The token was refused: ${reason}. Type it again.` : "";
    if ($("confirm").open) $("confirm").close();
    $("token").focus();
    setConn("the admin API needs its token", true);
    showMode();
  }

  function showMode() {
    const operate = operating();
    $("mode").textContent = page.askingToken ? "" : operate ? "operate view" : "read view: no actions";
    $("operate").hidden = page.askingToken || operate;
    $("forget").hidden = !token();
    for (const card of page.cards.values()) card.actions.hidden = !operate;
  }

  function setConn(text, bad) {
    const conn = $("conn");
    conn.textContent = text;
    conn.classList.toggle("bad", Boolean(bad));
  }

  // -- polling -------------------------------------------------------------------------------------

  function schedule(delay) {
    clearTimeout(page.timer);
    page.timer = setTimeout(poll, delay === undefined ? POLL_MS : delay);
  }

  async function poll() {
    if (page.polling) return schedule();
    page.polling = true;
    try {
      const status = await api("GET", "/status");
      page.status = status;
      const names = Object.keys(status.services || {});
      await Promise.all([loadEvents(), ...names.map(loadHistory)]);
      page.askingToken = false;
      $("login").hidden = true;
      $("services").hidden = false;
      render();
      setConn(`live · updated ${clock(now())}`);
    } catch (exc) {
      if (exc.status !== 401) setConn(`error: ${exc.message}`, true);
    } finally {
      page.polling = false;
      // While the token form is up, the form's submit polls again.
      if (!page.askingToken) schedule();
    }
  }

  async function loadEvents() {
    const data = await api("GET", `/events?since=${page.lastEventId}`);
    const found = (data && data.events) || [];
    for (const event of found) {
      if (typeof event.id === "number" && event.id > page.lastEventId) {
        page.events.push(event);
        page.lastEventId = event.id;
      }
    }
    if (page.events.length > MAX_EVENTS) page.events.splice(0, page.events.length - MAX_EVENTS);
  }

  async function loadHistory(service) {
    let series = page.history.get(service);
    if (!series) {
      series = new Map();
      page.history.set(service, series);
    }
    let since = 0;
    for (const rows of series.values()) {
      if (rows.length) since = Math.max(since, rows[rows.length - 1][0]);
    }
    const query = `service=${encodeURIComponent(service)}&since=${since ? since + 0.001 : 0}`;
    const data = (await api("GET", `/history?${query}`)) || {};
    for (const version of [...series.keys()]) if (!(version in data)) series.delete(version);
    let newest = 0;
    for (const [version, rows] of Object.entries(data)) {
      const kept = series.get(version) || [];
      const last = kept.length ? kept[kept.length - 1][0] : -Infinity;
      for (const row of rows) if (row[0] > last) kept.push(row);
      series.set(version, kept);
      if (kept.length) newest = Math.max(newest, kept[kept.length - 1][0]);
    }
    for (const rows of series.values()) {
      let drop = 0;
      while (drop < rows.length && rows[drop][0] < newest - WINDOW_S) drop += 1;
      rows.splice(0, drop);
    }
  }

  // -- rendering -----------------------------------------------------------------------------------

  function render() {
    const services = page.status.services || {};
    const holder = $("services");
    for (const [name, card] of page.cards) {
      if (!(name in services)) {
        card.root.remove();
        page.cards.delete(name);
      }
    }
    for (const [name, service] of Object.entries(services)) {
      let card = page.cards.get(name);
      if (!card) {
        card = buildCard(name, page.cards.size);
        page.cards.set(name, card);
        holder.append(card.root);
      }
      renderService(card, name, service);
    }
    renderFleet(page.status.fleet);
    showMode();
  }

  function buildCard(name, index) {
    const id = `svc${index}`;
    const title = el("h2", { text: name, attrs: { id: `${id}-title` } });
    const phase = el("span", { cls: "badge" });
    const head = el("div", { cls: "svc-head" }, title, phase);
    const versions = el("div", { cls: "versions", attrs: { role: "table", "aria-label": `versions of ${name}` } });
    const actions = el("div", { cls: "actions", attrs: { role: "group", "aria-label": `actions on ${name}` } });
    const note = el("p", { cls: "result", attrs: { role: "status" } });
    const charts = el("div", { cls: "charts" });
    const chartParts = {};
    for (const [key, label] of [["rps", "Request rate (req/s)"], ["success", "Success rate (%)"], ["p99", "p99 latency (ms)"]]) {
      const figure = el("figure", { cls: "chart" });
      const caption = el("figcaption", { text: label });
      const area = svg("svg", { viewBox: "0 0 320 150", role: "img", "aria-label": `${label} of ${name}`, "data-chart": key });
      figure.append(caption, area);
      charts.append(figure);
      chartParts[key] = area;
    }
    const legend = el("p", { cls: "legend" });
    const rollout = el("div", { cls: "rollout" });
    const timeline = el("ol", { cls: "timeline", attrs: { "aria-label": `decision record of ${name}` } });
    const root = el(
      "section",
      { cls: "card service", attrs: { "aria-labelledby": `${id}-title` } },
      head,
      versions,
      actions,
      note,
      el("h3", { text: "Last 15 minutes" }),
      charts,
      legend,
      rollout,
      el("h3", { text: "Decision record (newest first)" }),
      timeline,
    );
    const card = { root, phase, versions, actions, note, charts: chartParts, legend, rollout, timeline, name };
    buildActions(card);
    return card;
  }

  function versionClass(service, version) {
    const names = Object.keys(service.versions || {});
    return `c${Math.max(0, names.indexOf(version)) % 6}`;
  }

  function renderService(card, name, service) {
    const rollout = service.rollout;
    card.phase.textContent = rollout ? `rollout ${rollout.phase}` : "no rollout";
    card.phase.className = `badge phase-${rollout ? rollout.phase : "none"}`;
    renderVersions(card, name, service);
    renderCharts(card, name, service);
    renderRollout(card, name, service);
    renderTimeline(card, name);
  }

  function bar(percent, cls, label) {
    const width = Math.max(0, Math.min(100, percent || 0));
    const area = svg("svg", { viewBox: "0 0 100 6", preserveAspectRatio: "none", class: "bar", role: "img", "aria-label": label });
    area.append(svg("rect", { x: 0, y: 0, width: 100, height: 6, class: "bar-bg" }));
    area.append(svg("rect", { x: 0, y: 0, width, height: 6, class: cls }));
    return area;
  }

  const OBSERVED_S = 10; // the observed share: the chart rows of the last 10 s

  function observedShares(name) {
    // {version: percent of the service's requests} over the newest rows; {} without traffic.
    const series = page.history.get(name) || new Map();
    let newest = 0;
    for (const rows of series.values()) if (rows.length) newest = Math.max(newest, rows[rows.length - 1][0]);
    const sums = {};
    let total = 0;
    for (const [version, rows] of series) {
      let sum = 0;
      for (const row of rows) if (row[0] > newest - OBSERVED_S) sum += row[1];
      sums[version] = sum;
      total += sum;
    }
    const shares = {};
    if (total > 0) for (const [version, sum] of Object.entries(sums)) shares[version] = (100 * sum) / total;
    return shares;
  }

  function renderVersions(card, name, service) {
    const versions = service.versions || {};
    const shares = observedShares(name);
    const rows = [
      el(
        "div",
        { cls: "vrow vhead", attrs: { role: "row" } },
        ...["version", "revision", "weight / observed", "endpoints", "in flight"].map((h) =>
          el("span", { text: h, attrs: { role: "columnheader" } }),
        ),
      ),
    ];
    for (const [version, v] of Object.entries(versions)) {
      const cls = versionClass(service, version);
      const observed = version in shares ? shares[version] : null;
      const weights = el(
        "span",
        { cls: "weights", attrs: { role: "cell" } },
        el("span", { cls: "wlabel", text: `weight ${fmt(v.share)} % (${v.weight})` }),
        bar(v.share, `bar-fill ${cls}`, `configured weight ${fmt(v.share)} %`),
        el("span", { cls: "wlabel", text: `observed ${fmt(observed)} % (last ${OBSERVED_S} s)` }),
        bar(observed, `bar-fill observed ${cls}`, `observed share ${fmt(observed)} %`),
      );
      const endpoints = el("ul", { cls: "endpoints" });
      for (const endpoint of v.endpoints || []) {
        endpoints.append(
          el(
            "li",
            { cls: endpoint.healthy ? "healthy" : "unhealthy" },
            el("span", { cls: "address", text: endpoint.address }),
            el("span", { cls: "health", text: endpoint.healthy ? " healthy" : " unhealthy" }),
          ),
        );
      }
      rows.push(
        el(
          "div",
          { cls: "vrow", attrs: { role: "row", "data-version": version } },
          el("span", { cls: `vname ${cls}`, text: version, attrs: { role: "rowheader" } }),
          el("span", { cls: "revision", text: v.revision || "–", attrs: { role: "cell" } }),
          weights,
          el("span", { attrs: { role: "cell" } }, endpoints),
          el("span", { cls: "inflight", text: fmt(v.in_flight), attrs: { role: "cell" } }),
        ),
      );
    }
    card.versions.replaceChildren(...rows);
  }

  // -- charts --------------------------------------------------------------------------------------

  const CHART = { w: 320, h: 150, left: 40, right: 8, top: 10, bottom: 20 };

  function renderCharts(card, name, service) {
    const series = page.history.get(name) || new Map();
    let end = 0;
    for (const rows of series.values()) if (rows.length) end = Math.max(end, rows[rows.length - 1][0]);
    if (!end) end = now();
    const rollout = service.rollout;
    const running = rollout && RUNNING.has(rollout.phase);
    const limits = (running && rollout.thresholds) || {};
    const candidate = rollout ? rollout.candidate : null;
    const column = { rps: 1, success: 2, p99: 3 };
    const thresholds = {
      rps: null,
      success: limits.success_rate_min !== undefined ? { value: limits.success_rate_min, label: `${candidate} min ${fmt(limits.success_rate_min)} %` } : null,
      p99: limits.latency_p99_max_ms !== undefined ? { value: limits.latency_p99_max_ms, label: `${candidate} max ${fmt(limits.latency_p99_max_ms)} ms` } : null,
    };
    for (const [key, area] of Object.entries(card.charts)) {
      const lines = [];
      for (const [version, rows] of series) {
        lines.push({ version, cls: versionClass(service, version), points: rows.map((row) => [row[0], row[column[key]]]) });
      }
      drawChart(area, lines, thresholds[key], end, key === "success" ? 100 : null);
    }
    card.legend.replaceChildren(
      ...[...series.keys()].map((version) =>
        el("span", { cls: "key" }, el("span", { cls: `swatch ${versionClass(service, version)}` }), el("span", { text: version })),
      ),
    );
    if (thresholds.success || thresholds.p99) card.legend.append(el("span", { cls: "key" }, el("span", { cls: "swatch limit" }), el("span", { text: "rollout threshold" })));
  }

  function drawChart(area, lines, threshold, end, fixedTop) {
    const { w, h, left, right, top, bottom } = CHART;
    const start = end - WINDOW_S;
    let lo = Infinity;
    let hi = -Infinity;
    for (const line of lines) {
      for (const [, value] of line.points) {
        if (value === null || value === undefined) continue;
        lo = Math.min(lo, value);
        hi = Math.max(hi, value);
      }
    }
    if (threshold) {
      lo = Math.min(lo, threshold.value);
      hi = Math.max(hi, threshold.value);
    }
    if (fixedTop !== null) {
      // Success rate: 100 at the top, the lowest value (or threshold) a little above the bottom.
      hi = fixedTop;
      lo = lo === Infinity ? 90 : Math.max(0, Math.floor(Math.min(lo, 100) - 2));
      if (hi - lo < 5) lo = Math.max(0, hi - 5);
    } else {
      lo = 0;
      hi = hi === -Infinity || hi <= 0 ? 1 : hi * 1.15;
    }
    const x = (t) => left + ((t - start) / WINDOW_S) * (w - left - right);
    const y = (v) => top + (1 - (v - lo) / (hi - lo)) * (h - top - bottom);
    const parts = [svg("rect", { x: left, y: top, width: w - left - right, height: h - top - bottom, class: "plot" })];
    for (const value of [lo, (lo + hi) / 2, hi]) {
      parts.push(svg("line", { x1: left, x2: w - right, y1: y(value), y2: y(value), class: "grid" }));
      parts.push(svg("text", { x: left - 4, y: y(value) + 3, class: "tick ylabel" }, fmt(value, hi < 10 ? 2 : 0)));
    }
    for (const [offset, label] of [[WINDOW_S, "-15m"], [600, "-10m"], [300, "-5m"], [0, "now"]]) {
      parts.push(svg("text", { x: x(end - offset), y: h - 6, class: `tick xlabel${offset === 0 ? " end" : ""}` }, label));
    }
    if (threshold) {
      parts.push(svg("line", { x1: left, x2: w - right, y1: y(threshold.value), y2: y(threshold.value), class: "limit" }));
      parts.push(svg("text", { x: w - right - 2, y: y(threshold.value) - 3, class: "tick limit-label" }, threshold.label));
    }
    for (const line of lines) {
      let d = "";
      let count = 0;
      let pen = false;
      for (const [t, value] of line.points) {
        if (t < start || value === null || value === undefined) {
          pen = false; // a gap: no requests in that row
          continue;
        }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)} ${y(value).toFixed(1)}`;
        pen = true;
        count += 1;
      }
      const path = svg("path", { d: d || "M0 0", class: `series ${line.cls}`, "data-version": line.version, "data-points": count });
      path.append(svg("title", {}, line.version));
      parts.push(path);
    }
    area.replaceChildren(...parts);
  }

  // -- the rollout stepper -------------------------------------------------------------------------

  const VERDICTS = {
    step: "pass",
    promoting: "pass",
    promote: "pass",
    bake: "pass",
    hold: "inconclusive",
    check_failed: "fail",
    rollback: "fail",
    pause: "inconclusive",
  };

  // [label, value key, threshold key, "min" | "max", unit]
  const CHECKS = [
    ["requests", "requests", "min_requests", "minreq", ""],
    ["success rate", "success_rate", "success_rate_min", "min", " %"],
    ["slower than the p99 limit", "slower_than_limit_percent", null, "max1", " %"],
    ["p99 latency (estimate)", "latency_p99_ms", "latency_p99_max_ms", "info", " ms"],
    ["points below stable", "success_rate_drop", "success_rate_max_drop", "max", ""],
  ];

  function judge(kind, value, limit) {
    if (value === null || value === undefined) return "";
    if (kind === "minreq") return limit === undefined ? "" : value >= limit ? "pass" : "inconclusive";
    if (kind === "min") return limit === undefined ? "" : value >= limit ? "pass" : "fail";
    if (kind === "max") return limit === undefined ? "" : value <= limit ? "pass" : "fail";
    if (kind === "max1") return value <= 1 ? "pass" : "fail";
    return "";
  }

  function analysisTable(analysis) {
    const values = analysis.values || {};
    const limits = analysis.thresholds || {};
    const failed = new Set(analysis.failed || []);
    const body = el("tbody");
    for (const [label, key, limitKey, kind, unit] of CHECKS) {
      if (!(key in values)) continue;
      const limit = limitKey ? limits[limitKey] : kind === "max1" ? 1 : undefined;
      let verdict = judge(kind, values[key], limit);
      if (key === "success_rate" && failed.has("success_rate")) verdict = "fail";
      if (key === "slower_than_limit_percent" && failed.has("latency_p99")) verdict = "fail";
      if (key === "success_rate_drop" && failed.has("success_rate_vs_stable")) verdict = "fail";
      const sign = kind === "min" || kind === "minreq" ? "≥ " : "≤ ";
      body.append(
        el(
          "tr",
          { cls: verdict === "fail" ? "failed" : "" },
          el("th", { text: label, attrs: { scope: "row" } }),
          el("td", { text: `${fmt(values[key], 2)}${unit}` }),
          el("td", { text: limit === undefined ? "" : `${sign}${fmt(limit, 2)}${unit}` }),
          el("td", { cls: `verdict ${verdict}`, text: verdict }),
        ),
      );
    }
    const head = el("thead", {}, el("tr", {}, ...["check", "value", "threshold", ""].map((t) => el("th", { text: t, attrs: { scope: "col" } }))));
    return el("table", { cls: "analysis" }, head, body);
  }

  function renderRollout(card, name, service) {
    const rollout = service.rollout;
    if (!rollout) {
      card.rollout.replaceChildren();
      return;
    }
    const parts = [el("h3", { text: `Rollout: ${rollout.strategy}, ${rollout.candidate} against ${rollout.baseline}` })];
    const weights = rollout.step_weights || [];
    const steps = el("ol", { cls: "stepper", attrs: { "aria-label": `steps of the rollout of ${name}` } });
    const labels = weights.length ? weights.map((w) => `${fmt(w)} %`) : Array.from({ length: rollout.steps }, (_, i) => `step ${i + 1}`);
    labels.push(rollout.strategy === "canary" ? "100 % promoted" : "promoted");
    const running = RUNNING.has(rollout.phase);
    labels.forEach((label, index) => {
      const number = index + 1;
      let cls = "todo";
      if (rollout.phase === "promoted") cls = "done";
      else if (number < rollout.step) cls = "done";
      else if (number === rollout.step && running) cls = "current";
      else if (number === rollout.step) cls = "stopped";
      if (number === labels.length && rollout.phase === "promoting") cls = "current";
      const item = el("li", { cls }, el("span", { cls: "dot", text: number }), el("span", { text: label }));
      if (cls === "current") item.setAttribute("aria-current", "step");
      steps.append(item);
    });
    parts.push(steps);
    const facts = [`phase ${rollout.phase}`, `step ${rollout.step} of ${rollout.steps}`, `${rollout.candidate} at ${fmt(rollout.weight)} %`, `failed checks ${rollout.failed_checks} of ${rollout.threshold}`];
    if (running && rollout.phase !== "paused") {
      const analysed = rollout.last_analysis ? rollout.last_analysis.time : 0;
      const next = Math.max(rollout.step_at || 0, analysed || 0) + rollout.interval;
      facts.push(`next analysis in ${Math.max(0, Math.round(next - now()))} s (every ${fmt(rollout.interval)} s)`);
    }
    if (rollout.awaiting_promotion) facts.push("waiting for Promote");
    parts.push(el("p", { cls: "facts", text: facts.join(" · ") }));
    if (rollout.reason) parts.push(el("p", { cls: "reason", text: rollout.reason }));
    if (rollout.last_analysis) {
      const a = rollout.last_analysis;
      parts.push(el("h4", { text: `Last interval (${clock(a.time)}): ${a.verdict}` }));
      if (a.reason) parts.push(el("p", { cls: "reason", text: a.reason }));
      parts.push(analysisTable(a));
    }
    const intervals = intervalsOf(name);
    if (intervals.length) {
      parts.push(el("h4", { text: "Intervals of this run (newest first)" }));
      const list = el("ol", { cls: "intervals" });
      for (const event of intervals) {
        const v = event.values || {};
        const verdict = VERDICTS[event.action] || event.action;
        list.append(
          el(
            "li",
            { cls: `verdict-${verdict}` },
            el("span", { cls: "when", text: clock(event.time) }),
            el("span", { cls: `verdict ${verdict}`, text: `${verdict} (${event.action})` }),
            el("span", { text: `${fmt(v.requests)} req · success ${fmt(v.success_rate, 2)} % · p99 ${fmt(v.latency_p99_ms)} ms · ${fmt(v.success_rate_drop, 2)} below stable` }),
          ),
        );
      }
      parts.push(list);
    }
    card.rollout.replaceChildren(...parts);
  }

  function intervalsOf(name) {
    // The analyses since the service's latest run started, newest first.
    const mine = page.events.filter((e) => e.service === name);
    let from = 0;
    mine.forEach((e, index) => {
      if (e.action === "start") from = index;
    });
    return mine
      .slice(from)
      .filter((e) => e.values && typeof e.values.requests === "number")
      .reverse()
      .slice(0, INTERVAL_ROWS);
  }

  function renderTimeline(card, name) {
    const items = [];
    const mine = page.events.filter((e) => e.service === name || !e.service);
    for (const event of mine.slice(-TIMELINE_ROWS).reverse()) {
      const change = [weightsText(event.from), weightsText(event.to)].filter(Boolean).join(" → ");
      const item = el(
        "li",
        { attrs: { "data-event": event.id } },
        el("span", { cls: "when", text: clock(event.time) }),
        el("span", { cls: "action", text: event.action }),
        el("span", { cls: "actor", text: `by ${event.actor}${event.member ? ` on ${event.member}` : ""}` }),
        el("span", { cls: "reason", text: event.reason || "" }),
      );
      if (change) item.append(el("span", { cls: "change", text: change }));
      items.push(item);
    }
    if (!items.length) items.push(el("li", { cls: "empty", text: "no decisions yet" }));
    card.timeline.replaceChildren(...items);
  }

  // -- fleet ---------------------------------------------------------------------------------------

  function renderFleet(fleet) {
    const section = $("fleet");
    if (!fleet) {
      section.hidden = true;
      return;
    }
    section.hidden = false;
    const facts = `fleet ${fleet.name} · this member ${fleet.member} · leader ${fleet.leader || "none"} · store ${fleet.store_up ? "up" : "DOWN"} · generation ${fmt(fleet.generation)}`;
    const head = el("tr", {}, ...["member", "leader", "live", "applied generation", "last seen", "admin"].map((t) => el("th", { text: t, attrs: { scope: "col" } })));
    const body = el("tbody");
    for (const m of fleet.members || []) {
      body.append(
        el(
          "tr",
          { cls: m.live ? "" : "failed", attrs: { "data-member": m.id } },
          el("th", { text: m.id, attrs: { scope: "row" } }),
          el("td", { cls: "leader", text: m.leader ? "leader" : "" }),
          el("td", { text: m.live ? "live" : "gone" }),
          el("td", { cls: "applied", text: fmt(m.applied) }),
          el("td", { text: m.last_seen === null || m.last_seen === undefined ? "–" : `${fmt(m.last_seen)} s ago` }),
          el("td", { cls: "address", text: m.admin || "" }),
        ),
      );
    }
    $("fleet-body").replaceChildren(el("p", { cls: "facts", text: facts }), el("div", { cls: "scroll" }, el("table", { cls: "members" }, el("thead", {}, head), body)));
  }

  // -- actions -------------------------------------------------------------------------------------

  function buildActions(card) {
    const name = card.name;
    const spec = [
      ["Switch", "Switch…", openSwitch],
      ["Weights", "Weights…", openWeights],
      ["Rollback", "Rollback", () => simple(card, "Rollback", `All traffic of ${name} back to its stable (or previous) version at once.`, "POST", `${servicePath(name)}/rollback`)],
      ["Start", "Start rollout", () => simple(card, "Start", `Start a rollout of ${name}.`, "POST", `${servicePath(name)}/rollout/start`)],
      ["Pause", "Pause", () => simple(card, "Pause", `Pause the rollout of ${name}: its weights stay where they are.`, "POST", `${servicePath(name)}/rollout/pause`)],
      ["Resume", "Resume", () => simple(card, "Resume", `Resume the rollout of ${name}.`, "POST", `${servicePath(name)}/rollout/resume`)],
      ["Promote", "Promote", () => simple(card, "Promote", `Promote the canary of ${name}: skip the remaining steps.`, "POST", `${servicePath(name)}/rollout/promote`)],
      ["Abort", "Abort", () => simple(card, "Abort", `Abort the rollout of ${name}.`, "POST", `${servicePath(name)}/rollout/abort`)],
    ];
    for (const [verb, label, open] of spec) {
      const button = el("button", { text: label, cls: verb === "Rollback" || verb === "Abort" ? "danger" : "", attrs: { type: "button", "aria-label": `${verb} ${name}` } });
      button.addEventListener("click", () => open(card));
      card.actions.append(button);
    }
  }

  const dialog = {
    run: null, // async () => result, set by the opener
    ready: true,
    card: null,
  };

  function openDialog(card, title, run) {
    dialog.run = run;
    dialog.card = card;
    dialog.ready = true;
    $("confirm-title").textContent = title;
    $("confirm-error").replaceChildren();
    $("confirm-result").textContent = "";
    $("confirm-ok").disabled = false;
    $("confirm-ok").textContent = `Confirm: ${title}`;
    const body = $("confirm-body");
    body.replaceChildren();
    $("confirm").showModal();
    return body;
  }

  function showError(exc) {
    const box = $("confirm-error");
    const parts = [el("span", { cls: "code", text: exc.status ? `${exc.status}: ` : "" }), el("span", { cls: "message", text: exc.message })];
    if (exc.details && exc.details.length) {
      parts.push(el("ul", {}, ...exc.details.map((d) => el("li", { text: d }))));
    }
    box.replaceChildren(...parts);
  }

  function simple(card, verb, text, method, path) {
    const body = openDialog(card, `${verb} ${card.name}`, () => api(method, path));
    body.append(el("p", { text }));
  }

  function currentService(name) {
    return (page.status && page.status.services && page.status.services[name]) || { versions: {} };
  }

  function openSwitch(card) {
    const name = card.name;
    const service = currentService(name);
    const versions = Object.keys(service.versions);
    const target = el("select", { attrs: { id: "switch-to" } });
    // The version without traffic first: the usual switch target.
    const ordered = [...versions].sort((a, b) => service.versions[a].weight - service.versions[b].weight);
    for (const v of ordered) target.append(el("option", { text: v, attrs: { value: v } }));
    const force = el("input", { attrs: { type: "checkbox", id: "switch-force" } });
    const preview = el("div", { cls: "dryrun", attrs: { "aria-live": "polite" } });
    const body = openDialog(card, `Switch ${name}`, () => api("POST", `${servicePath(name)}/switch`, { to: target.value, force: force.checked, dry_run: false }));
    body.append(
      el("p", { text: `All traffic of ${name} to one version at once; the others drain.` }),
      el("label", { text: "to version ", attrs: { for: "switch-to" } }),
      target,
      el("p", {}, force, el("label", { text: " force (even without a healthy endpoint)", attrs: { for: "switch-force" } })),
      el("h3", { text: "Dry run" }),
      preview,
    );
    const dryRun = async () => {
      $("confirm-ok").disabled = true;
      $("confirm-error").replaceChildren();
      preview.replaceChildren(el("p", { text: "asking the API…" }));
      try {
        const result = await api("POST", `${servicePath(name)}/switch`, { to: target.value, force: force.checked, dry_run: true });
        preview.replaceChildren(
          el("p", { text: `now: ${weightsText(result.from)}` }),
          el("p", { text: `after: ${weightsText(result.to)}` }),
        );
        $("confirm-ok").disabled = false;
      } catch (exc) {
        preview.replaceChildren(el("p", { text: "the switch would be refused:" }));
        showError(exc);
      }
    };
    target.addEventListener("change", dryRun);
    force.addEventListener("change", dryRun);
    dryRun();
  }

  function openWeights(card) {
    const name = card.name;
    const service = currentService(name);
    const inputs = {};
    const total = el("p", { cls: "facts" });
    const update = () => {
      let sum = 0;
      for (const input of Object.values(inputs)) sum += Number(input.value) || 0;
      total.textContent = `sum ${sum} of ${service.weight_total}`;
    };
    const body = openDialog(card, `Weights ${name}`, () => {
      const weights = {};
      for (const [v, input] of Object.entries(inputs)) weights[v] = Number(input.value);
      return api("PUT", `${servicePath(name)}/weights`, { weights });
    });
    body.append(el("p", { text: `New weights for ${name}; they must sum to ${service.weight_total}.` }));
    Object.entries(service.versions).forEach(([v, info], index) => {
      const id = `weight-${index}`;
      const input = el("input", { attrs: { type: "number", min: 0, max: service.weight_total, step: 1, id, value: info.weight } });
      input.addEventListener("input", update);
      inputs[v] = input;
      body.append(el("p", { cls: "field" }, el("label", { text: `${v} `, attrs: { for: id } }), input));
    });
    body.append(total);
    update();
  }

  async function confirmed(event) {
    event.preventDefault();
    if (!dialog.run || !dialog.ready) return;
    dialog.ready = false;
    $("confirm-ok").disabled = true;
    $("confirm-error").replaceChildren();
    $("confirm-result").textContent = "sending…";
    const card = dialog.card;
    const title = $("confirm-title").textContent;
    try {
      const result = await dialog.run();
      const pending = result && result.members && result.members.pending;
      const extra = pending && pending.length ? ` (members still pending: ${pending.join(", ")})` : "";
      $("confirm").close();
      if (card) card.note.textContent = `${title}: done${extra}`;
      schedule(0);
    } catch (exc) {
      $("confirm-result").textContent = "";
      if (exc.status !== 401) showError(exc);
      $("confirm-ok").disabled = false;
      dialog.ready = true;
    }
  }

  // -- start ---------------------------------------------------------------------------------------

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      $("login-error").textContent = "";
      page.askingToken = false;
      schedule(0);
    });
    $("operate").addEventListener("click", () => {
      sessionStorage.setItem(MODE_KEY, "operate");
      showMode();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      sessionStorage.removeItem(MODE_KEY);
      schedule(0);
      showMode();
    });
    $("confirm-form").addEventListener("submit", confirmed);
    $("confirm-cancel").addEventListener("click", () => $("confirm").close());
    $("confirm").addEventListener("close", () => {
      dialog.run = null;
      dialog.card = null;
    });
    showMode();
    poll();
  }

  start();
})();
