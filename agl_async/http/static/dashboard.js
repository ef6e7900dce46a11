/* agl-async dashboard: polls the store server's /v1/dashboard/* JSON routes and renders them.
 * Plain JavaScript, no build step. Every value from the store is put into the page as text
 * (textContent / text nodes), never as HTML. Charts: uPlot (vendored, MIT). */
(() => {
  "use strict";

  const ROLLOUT_STATUSES = ["queuing", "requeuing", "preparing", "running", "succeeded", "failed", "cancelled"];
  const POLL_MS = 2000;
  const PAGE = 25;
  const CHART_HEIGHT = 220;

  const state = {
    paused: false,
    timer: null,
    status: "",
    q: "",
    offset: 0,
    selected: null,
    detailText: null,
    serverOffset: 0, // server clock minus this browser's clock, seconds
    charts: {},
    gated: false,
  };

  const $ = (selector) => document.querySelector(selector);

  /** Build an element; strings become text nodes (never parsed as HTML). */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  // ------------------------------------------------------------------ formatting
  const now = () => Date.now() / 1000 + state.serverOffset;
  const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "—");
  const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString([], { hour12: false }) : "—");
  const dateTime = (t) => (t ? new Date(t * 1000).toLocaleString([], { hour12: false }) : "");

  function fmtSeconds(s) {
    if (s === null || s === undefined || !isFinite(s)) return "—";
    if (s < 0) s = 0;
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  }

  function ago(t) {
    if (!t) return "never";
    const s = Math.max(0, now() - t);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${(s / 3600).toFixed(1)} h ago`;
  }

  const duration = (start, end) => fmtSeconds((end || now()) - start);
  const fmtReward = (r) => (typeof r === "number" ? r.toFixed(3) : "—");
  const badge = (status) => h("span", { class: `badge s-${status}` }, status);
  const rolloutLink = (id) => h("a", { href: `#rollout=${encodeURIComponent(id)}`, class: "mono" }, id);

  function jsonText(value) {
    if (typeof value === "string") return value;
    try {
      return JSON.stringify(value, null, 2);
    } catch (e) {
      return String(value);
    }
  }

  // ------------------------------------------------------------------ server access
  class Unauthorized extends Error {}

  async function api(path, options) {
    const response = await fetch(path, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
      ...options,
    });
    if (response.status === 401) throw new Unauthorized("token required");
    const text = await response.text();
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = JSON.parse(text).detail || detail;
      } catch (e) {
        /* not JSON */
      }
      throw new Error(`${response.status}: ${detail}`);
    }
    return { text, data: JSON.parse(text) };
  }

  function setLive(kind, text) {
    $("#live-dot").className = `dot ${kind}`;
    $("#live-text").textContent = text;
  }

  // ------------------------------------------------------------------ summary: cards, charts, workers, queue
  function renderCards(stats) {
    const box = $("#status-cards");
    if (!box.childElementCount) {
      const card = (key, label, plain) =>
        h(
          "div",
          {
            class: `card ${plain ? "plain" : `s-${key}`}`,
            dataset: { status: key },
            role: plain ? null : "button",
            tabindex: plain ? null : "0",
            title: plain ? null : `show the ${label} rollouts`,
            onclick: plain ? null : () => setStatusFilter(key === "total" || state.status === key ? "" : key),
          },
          h("div", { class: "label" }, label),
          h("div", { class: "value" }, "—"),
        );
      box.append(card("total", "all rollouts"));
      for (const s of ROLLOUT_STATUSES) box.append(card(s, s));
      box.append(card("queue", "queue length", true), card("workers", "workers busy", true));
      box.append(card("attempts", "attempts", true), card("spans", "spans", true));
    }
    const counts = stats.rollouts || {};
    const set = (key, text) => {
      box.querySelector(`[data-status="${key}"] .value`).textContent = text;
    };
    set("total", fmtInt(stats.total_rollouts));
    for (const s of ROLLOUT_STATUSES) set(s, fmtInt(counts[s] || 0));
    const workers = stats.workers || {};
    const totalWorkers = Object.values(workers).reduce((a, b) => a + b, 0);
    set("queue", fmtInt(stats.queue_length));
    set("workers", `${fmtInt(workers.busy || 0)} / ${fmtInt(totalWorkers)}`);
    set("attempts", fmtInt(stats.total_attempts));
    set("spans", fmtInt(stats.total_spans));
    for (const el of box.querySelectorAll(".card")) {
      el.classList.toggle("active", el.dataset.status === (state.status || "total"));
    }
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function chartOptions(el, series) {
    const muted = cssVar("--muted");
    const line = cssVar("--line");
    const axis = { stroke: muted, grid: { stroke: line, width: 1 }, ticks: { stroke: line, width: 1 } };
    return {
      width: Math.max(200, el.clientWidth),
      height: CHART_HEIGHT,
      scales: { x: { time: true } },
      axes: [axis, { ...axis, size: 56 }],
      series: [{}, ...series],
      cursor: { drag: { x: false, y: false } },
      legend: { live: true },
    };
  }

  function setChart(key, el, data, series) {
    const points = data[1].filter((v) => v !== null && v !== undefined).length;
    el.dataset.points = String(points);
    let empty = el.querySelector(".empty");
    if (!data[0].length) {
      if (!empty) el.append(h("div", { class: "empty" }, "no finished rollouts yet"));
      return;
    }
    if (empty) empty.remove();
    if (typeof window.uPlot !== "function") return; // the library did not load: counts still show
    const chart = state.charts[key];
    if (!chart) {
      state.charts[key] = new window.uPlot(chartOptions(el, series), data, el);
      new ResizeObserver(() => {
        state.charts[key].setSize({ width: Math.max(200, el.clientWidth), height: CHART_HEIGHT });
      }).observe(el);
    } else {
      chart.setData(data);
    }
  }

  // Throughput is a count per interval: bars (uPlot's bar path builder), when the library has it.
  const bars = () => (window.uPlot && window.uPlot.paths && window.uPlot.paths.bars ? window.uPlot.paths.bars({ size: [0.8, 40] }) : undefined);

  function renderCharts(timeline) {
    const perMinute = 60 / (timeline.bucket_seconds || 1);
    const t = timeline.t;
    const green = cssVar("--succeeded");
    const red = cssVar("--failed");
    const blue = cssVar("--reward");
    setChart(
      "throughput",
      $("#throughput-chart"),
      [t, timeline.succeeded.map((n) => n * perMinute), timeline.failed.map((n) => n * perMinute)],
      [
        { label: "succeeded / min", stroke: green, fill: `${green}55`, width: 1, paths: bars(), points: { show: false } },
        { label: "failed / min", stroke: red, fill: `${red}88`, width: 1, paths: bars(), points: { show: false } },
      ],
    );
    setChart(
      "reward",
      $("#reward-chart"),
      [t, timeline.reward_mean],
      [{ label: "mean reward", stroke: blue, width: 2, spanGaps: true, points: { size: 4 } }],
    );
  }

  function renderWorkers(workers, total) {
    $("#workers-count").textContent = total > workers.length ? `${workers.length} of ${fmtInt(total)}` : fmtInt(total);
    const rows = workers.map((w) =>
      h(
        "tr",
        { dataset: { workerId: String(w.worker_id) } },
        h("td", { class: "id" }, String(w.worker_id)),
        h("td", null, badge(w.status)),
        h("td", { title: dateTime(w.last_heartbeat_time) }, ago(w.last_heartbeat_time)),
        h("td", null, w.current_rollout_id ? rolloutLink(w.current_rollout_id) : h("span", { class: "muted" }, "—")),
      ),
    );
    if (!rows.length) rows.push(h("tr", null, h("td", { class: "empty", colspan: 4 }, "no worker has reported yet")));
    $("#workers tbody").replaceChildren(...rows);
  }

  function renderQueue(queue) {
    $("#queue-count").textContent = `${fmtInt(queue.length)} waiting`;
    const rows = queue.oldest.map((r) =>
      h(
        "tr",
        null,
        h("td", { class: "id" }, rolloutLink(r.rollout_id)),
        h("td", null, badge(r.status)),
        h("td", null, duration(r.start_time, null)),
      ),
    );
    if (!rows.length) rows.push(h("tr", null, h("td", { class: "empty", colspan: 3 }, "the queue is empty")));
    $("#queue tbody").replaceChildren(...rows);
  }

  async function loadSummary() {
    const { data } = await api("v1/dashboard/summary");
    state.serverOffset = data.now - Date.now() / 1000;
    $("#store-name").textContent = data.statistics.name || "";
    renderCards(data.statistics);
    renderCharts(data.timeline);
    renderWorkers(data.workers, data.workers_total);
    renderQueue(data.queue);
  }

  // ------------------------------------------------------------------ rollouts table
  function setStatusFilter(status) {
    state.status = status;
    state.offset = 0;
    $("#status-filter").value = status;
    refreshSoon();
  }

  async function loadRollouts() {
    const params = new URLSearchParams({ limit: String(PAGE), offset: String(state.offset) });
    if (state.status) params.set("status", state.status);
    if (state.q) params.set("q", state.q);
    const { data } = await api(`v1/dashboard/rollouts?${params}`);
    const rows = data.items.map((r) =>
      h(
        "tr",
        {
          class: r.rollout_id === state.selected ? "selected" : null,
          dataset: { rolloutId: r.rollout_id },
          onclick: () => select(r.rollout_id, true),
        },
        h("td", { class: "id" }, r.rollout_id),
        h("td", null, badge(r.status)),
        h("td", null, r.mode || h("span", { class: "muted" }, "—")),
        h("td", { title: dateTime(r.start_time) }, clock(r.start_time)),
        h("td", null, duration(r.start_time, r.end_time)),
        h("td", { class: "num" }, fmtReward(r.reward)),
      ),
    );
    if (!rows.length) rows.push(h("tr", null, h("td", { class: "empty", colspan: 6 }, "no rollout matches")));
    $("#rollouts tbody").replaceChildren(...rows);
    const first = data.items.length ? data.offset + 1 : 0;
    const last = data.offset + data.items.length;
    $("#page-info").textContent =
      data.total === null
        ? `${fmtInt(first)}–${fmtInt(last)}${data.has_more ? " (more)" : ""}`
        : `${fmtInt(first)}–${fmtInt(last)} of ${fmtInt(data.total)}`;
    $("#prev").disabled = data.offset === 0;
    $("#next").disabled = !data.has_more;
  }

  // ------------------------------------------------------------------ one rollout
  function field(label, value, title) {
    return h("div", null, h("dt", null, label), h("dd", { title: title || null }, value));
  }

  function spanTree(spans) {
    const byId = new Map();
    for (const s of spans) byId.set(s.span_id, { span: s, children: [] });
    const roots = [];
    for (const node of byId.values()) {
      const parent = node.span.parent_id ? byId.get(node.span.parent_id) : null;
      if (parent && parent !== node) parent.children.push(node);
      else roots.push(node);
    }
    const order = (a, b) => (a.span.start_time || 0) - (b.span.start_time || 0) || a.span.sequence_id - b.span.sequence_id;
    const sortAll = (nodes, depth) => {
      nodes.sort(order);
      if (depth < 64) for (const n of nodes) sortAll(n.children, depth + 1);
    };
    sortAll(roots, 0);
    return roots;
  }

  function spanNode(node, t0, total, open, depth) {
    const s = node.span;
    const start = s.start_time ?? t0;
    const end = s.end_time ?? start;
    const bar = h("span", { class: `bar ${s.status_code === "error" ? "s-error" : ""}` });
    bar.style.left = `${(100 * (start - t0)) / total}%`;
    bar.style.width = `${(100 * Math.max(0, end - start)) / total}%`;
    const attrs = Object.entries(s.attributes || {}).map(([k, v]) =>
      h("tr", null, h("td", null, k), h("td", null, jsonText(v))),
    );
    const extra = [
      ["span_id", s.span_id],
      ["parent_id", s.parent_id || "—"],
      ["trace_id", s.trace_id],
      ["sequence_id", String(s.sequence_id)],
      ["status", (s.status_code || "unset") + (s.status_message ? `: ${s.status_message}` : "")],
    ];
    if (s.events && s.events.length) extra.push(["events", jsonText(s.events)]);
    const row = h(
      "details",
      { class: "span-row", open: open.has(s.span_id) },
      h(
        "summary",
        null,
        h("span", { class: "span-name", title: s.name }, h("span", { class: "caret" }, "▸"), s.name),
        h("span", { class: "bar-track" }, bar),
        h("span", { class: "span-duration" }, s.end_time && s.start_time ? fmtSeconds(end - start) : "—"),
      ),
      h(
        "div",
        { class: "span-body" },
        h(
          "table",
          { class: "attrs" },
          h("tbody", null, attrs, extra.map(([k, v]) => h("tr", { class: "muted" }, h("td", null, k), h("td", null, v)))),
        ),
      ),
    );
    const children = depth < 64 ? node.children.map((c) => spanNode(c, t0, total, open, depth + 1)) : [];
    return h(
      "div",
      { class: "span-node", dataset: { spanId: s.span_id, spanName: s.name } },
      row,
      children.length ? h("div", { class: "span-children" }, children) : null,
    );
  }

  function renderSpans(attempts, spans, total) {
    const open = new Set([...document.querySelectorAll("#spans details[open]")].map((d) => d.parentElement.dataset.spanId));
    const box = $("#spans");
    $("#spans-count").textContent = total > spans.length ? `${fmtInt(spans.length)} of ${fmtInt(total)}` : fmtInt(total);
    if (!spans.length) {
      box.replaceChildren(h("p", { class: "muted" }, "no spans recorded"));
      return;
    }
    const byAttempt = new Map(attempts.map((a) => [a.attempt_id, []]));
    for (const s of spans) {
      if (!byAttempt.has(s.attempt_id)) byAttempt.set(s.attempt_id, []);
      byAttempt.get(s.attempt_id).push(s);
    }
    const sections = [];
    for (const [attemptId, group] of byAttempt) {
      if (!group.length) continue;
      const attempt = attempts.find((a) => a.attempt_id === attemptId);
      const starts = group.map((s) => s.start_time).filter((x) => typeof x === "number");
      const ends = group.map((s) => s.end_time ?? s.start_time).filter((x) => typeof x === "number");
      const t0 = starts.length ? Math.min(...starts) : 0;
      const total = Math.max(1e-9, (ends.length ? Math.max(...ends) : t0) - t0);
      sections.push(
        h(
          "div",
          { class: "attempt-spans", dataset: { attemptId } },
          h(
            "div",
            { class: "attempt-title" },
            `attempt ${attempt ? attempt.sequence_id : "?"} · ${attemptId} · ${group.length} span${group.length === 1 ? "" : "s"}`,
          ),
          spanTree(group).map((n) => spanNode(n, t0, total, open, 0)),
        ),
      );
    }
    box.replaceChildren(...sections);
  }

  function renderDetail(data) {
    const r = data.rollout;
    $("#detail").hidden = false;
    $("#detail-id").textContent = r.rollout_id;
    $("#detail-status").replaceChildren(badge(r.status));
    const config = r.config || {};
    $("#detail-fields").replaceChildren(
      field("Mode", r.mode || "—"),
      field("Started", clock(r.start_time), dateTime(r.start_time)),
      field("Ended", r.end_time ? clock(r.end_time) : "—", dateTime(r.end_time)),
      field("Duration", duration(r.start_time, r.end_time)),
      field("Reward", fmtReward(r.reward)),
      field("Resources", r.resources_id || "—"),
      field("Attempts", `${data.attempts.length} of max ${config.max_attempts ?? 1}`),
      field("Retry on", (config.retry_condition || []).join(", ") || "—"),
      field(
        "Time limits",
        [
          config.timeout_seconds ? `${config.timeout_seconds} s running` : null,
          config.unresponsive_seconds ? `${config.unresponsive_seconds} s silent` : null,
        ]
          .filter(Boolean)
          .join(" · ") || "none",
      ),
    );
    $("#detail-input").textContent = jsonText(r.input) + (r.input_truncated ? "\n(truncated)" : "");
    $("#attempts tbody").replaceChildren(
      ...data.attempts.map((a) =>
        h(
          "tr",
          null,
          h("td", null, String(a.sequence_id)),
          h("td", { class: "id" }, a.attempt_id),
          h("td", null, badge(a.status)),
          h("td", { class: "id" }, a.worker_id === null || a.worker_id === undefined ? "—" : String(a.worker_id)),
          h("td", { title: dateTime(a.start_time) }, clock(a.start_time)),
          h("td", null, duration(a.start_time, a.end_time)),
          h("td", { title: dateTime(a.last_heartbeat_time) }, ago(a.last_heartbeat_time)),
        ),
      ),
    );
    renderSpans(data.attempts, data.spans, data.spans_total);
  }

  async function loadDetail(id) {
    try {
      const { text, data } = await api(`v1/dashboard/rollouts/${encodeURIComponent(id)}`);
      if (id !== state.selected) return;
      if (text !== state.detailText) {
        state.detailText = text;
        renderDetail(data);
      }
    } catch (e) {
      if (e instanceof Unauthorized) throw e;
      if (id !== state.selected) return;
      $("#detail").hidden = false;
      $("#detail-id").textContent = id;
      $("#detail-status").replaceChildren(h("span", { class: "error" }, e.message));
    }
  }

  function select(id, scroll) {
    if (location.hash !== `#rollout=${encodeURIComponent(id)}`) {
      history.replaceState(null, "", `#rollout=${encodeURIComponent(id)}`);
    }
    state.selected = id;
    state.detailText = null;
    for (const tr of document.querySelectorAll("#rollouts tbody tr")) {
      tr.classList.toggle("selected", tr.dataset.rolloutId === id);
    }
    loadDetail(id)
      .then(() => scroll && $("#detail").scrollIntoView({ behavior: "smooth", block: "start" }))
      .catch(onError);
  }

  function readHash() {
    const hash = decodeURIComponent(location.hash.slice(1));
    if (hash === "token-rejected") {
      $("#token-rejected").hidden = false;
      history.replaceState(null, "", location.pathname);
      return;
    }
    if (hash.startsWith("rollout=")) {
      const id = hash.slice("rollout=".length);
      if (id && id !== state.selected) select(id, true);
    }
  }

  // ------------------------------------------------------------------ polling
  function showGate() {
    state.gated = true;
    $("#content").hidden = true;
    $("#token-gate").hidden = false;
    setLive("down", "token required");
    $("#token-input").focus();
  }

  function onError(e) {
    if (e instanceof Unauthorized) showGate();
    else setLive("down", `disconnected, retrying (${e.message})`);
  }

  async function tick() {
    clearTimeout(state.timer);
    if (!state.paused && !document.hidden && !state.gated) {
      try {
        await Promise.all([loadSummary(), loadRollouts(), state.selected ? loadDetail(state.selected) : null]);
        $("#content").hidden = false;
        $("#token-gate").hidden = true;
        setLive("ok", `live · updated ${clock(Date.now() / 1000)}`);
      } catch (e) {
        onError(e);
      }
    }
    if (!state.gated) state.timer = setTimeout(tick, POLL_MS);
  }

  function refreshSoon() {
    clearTimeout(state.timer);
    state.timer = setTimeout(tick, 0);
  }

  function init() {
    const filter = $("#status-filter");
    for (const s of ROLLOUT_STATUSES) filter.append(h("option", { value: s }, s));
    filter.addEventListener("change", () => setStatusFilter(filter.value));
    let debounce = null;
    $("#search").addEventListener("input", (e) => {
      clearTimeout(debounce);
      debounce = setTimeout(() => {
        state.q = e.target.value.trim();
        state.offset = 0;
        refreshSoon();
      }, 250);
    });
    $("#prev").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - PAGE);
      refreshSoon();
    });
    $("#next").addEventListener("click", () => {
      state.offset += PAGE;
      refreshSoon();
    });
    $("#pause").addEventListener("click", () => {
      state.paused = !state.paused;
      $("#pause").textContent = state.paused ? "Resume" : "Pause";
      if (state.paused) setLive("paused", "paused");
      refreshSoon();
    });
    $("#detail-close").addEventListener("click", () => {
      state.selected = null;
      $("#detail").hidden = true;
      history.replaceState(null, "", location.pathname);
      for (const tr of document.querySelectorAll("#rollouts tbody tr.selected")) tr.classList.remove("selected");
    });
    $("#token-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const response = await fetch("v1/dashboard/session", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: $("#token-input").value }),
      });
      if (response.ok) {
        $("#token-input").value = "";
        $("#token-rejected").hidden = true;
        state.gated = false;
        refreshSoon();
      } else {
        $("#token-rejected").hidden = false;
      }
    });
    document.addEventListener("visibilitychange", () => document.hidden || refreshSoon());
    window.addEventListener("hashchange", readHash);
    readHash();
    tick();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
