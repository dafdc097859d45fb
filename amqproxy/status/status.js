// amqproxy status page: polls the admin API's JSON endpoints and renders them.
//
// Every value reaches the page as a text node (textContent, append of strings), never as markup:
// user names and vhosts are client input. No HTML parsing of data, no framework, no build step.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const INTERVAL_S = Math.min(60, Math.max(0.5, Number(params.get("refresh")) || 2));
  const ENDPOINTS = ["healthz", "readyz", "stats", "upstreams", "vhosts", "limits"];
  // Answers that are data even with an error status (503: not ready, no worker serving).
  const ANY_STATUS = new Set(["healthz", "readyz"]);

  const $ = (id) => document.getElementById(id);

  function el(tag, className, ...children) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    for (const child of children) {
      node.append(child instanceof Node ? child : String(child ?? ""));
    }
    return node;
  }

  function badge(text, tone) {
    return el("span", "badge " + tone, text);
  }

  function num(value) {
    return typeof value === "number" ? value.toLocaleString("en-US") : "–";
  }

  function duration(seconds) {
    if (typeof seconds !== "number" || !isFinite(seconds)) return "–";
    const s = Math.max(0, seconds);
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + " min " + Math.floor(s % 60) + " s";
    const h = Math.floor(m / 60);
    if (h < 48) return h + " h " + (m % 60) + " min";
    return Math.floor(h / 24) + " d " + (h % 24) + " h";
  }

  function clock(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleTimeString("en-GB", { hour12: false });
  }

  // Fill a table's body with rows of cells; each cell is a value or [value, className].
  // The header texts label the cells for the narrow (card) layout.
  function fillTable(id, rows) {
    const table = $(id);
    const labels = Array.from(table.tHead.rows[0].cells, (th) => [th.textContent, th.className]);
    const body = table.tBodies[0];
    body.replaceChildren(
      ...rows.map((cells) => {
        const tr = document.createElement("tr");
        cells.forEach((cell, i) => {
          const [value, className] = Array.isArray(cell) ? cell : [cell, ""];
          const td = el("td", [labels[i][1], className].filter(Boolean).join(" "), value);
          td.setAttribute("data-label", labels[i][0]);
          tr.append(td);
        });
        return tr;
      })
    );
    const empty = $(id + "-empty");
    if (empty) empty.hidden = rows.length > 0;
    table.hidden = rows.length === 0;
  }

  function text(id, value) {
    $(id).textContent = value;
  }

  // ------------------------------------------------------------------ sections

  function renderHeader(health, ready) {
    text("version", health.version || "–");
    text("uptime", duration(health.uptime_s));
    const readyBadge = $("ready");
    readyBadge.textContent = ready.ready ? "ready" : "not ready";
    readyBadge.className = "badge " + (ready.ready ? "ok" : "bad");
    const reasons = ready.reasons || [];
    $("not-ready").hidden = ready.ready || reasons.length === 0;
    text("not-ready", "Not ready: " + reasons.join("; "));
    text("updated", new Date().toLocaleTimeString("en-GB", { hour12: false }));
  }

  function renderTotals(stats) {
    const t = stats.totals || {};
    text("total-clients", num(t.clients));
    text("total-client-channels", num(t.client_channels));
    text("total-handshaking", num(t.handshaking_clients));
    text("total-upstreams", num(t.upstream_connections));
    text("total-upstream-channels", num(t.upstream_channels));
  }

  function renderPools(stats) {
    const rows = (stats.pools || []).map((p) => {
      const conns = p.upstream_connections || {};
      const byNode = Object.entries(p.upstream_connections_by_node || {})
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([node, n]) => node + ": " + num(n.in_use) + " / " + num(n.idle))
        .join(", ");
      return [
        p.vhost,
        p.user,
        [num(p.clients), "num"],
        [num(p.client_channels), "num"],
        [num(conns.in_use), "num"],
        [num(conns.idle), "num"],
        [num(p.upstream_channels), "num"],
        byNode || "–",
      ];
    });
    fillTable("pools", rows);
  }

  const BREAKER_TONE = { closed: "ok", "half-open": "warn", open: "bad" };

  function nextChange(node) {
    if (node.retired) return "retired: closes once its connections are empty";
    if (node.breaker === "open") {
      return node.breaker_open_for_s > 0
        ? "half-open in " + duration(node.breaker_open_for_s)
        : "half-open at the next connection attempt";
    }
    if (node.breaker === "half-open") return "closed or open again at the outcome of the probe connection";
    return "–";
  }

  function renderNodes(upstreams) {
    const rows = (upstreams.nodes || []).map((n) => {
      const error = n.last_error ? n.last_error + " (" + duration(n.last_error_age_s) + " ago)" : "–";
      return [
        n.node,
        n.worker ?? "",
        [badge(n.breaker, BREAKER_TONE[n.breaker] || "muted"), ""],
        nextChange(n),
        [num(n.consecutive_failures), "num"],
        [num(n.connections), "num"],
        error,
      ];
    });
    fillTable("nodes", rows);
  }

  function renderEvents(upstreams) {
    const rows = (upstreams.events || []).map((e) => [
      clock(e.at) + " (" + duration(e.age_s) + " ago)",
      [badge(e.kind, e.kind === "failure" ? "bad" : "ok"), ""],
      e.node || "clients",
      e.worker ?? "",
      e.text,
      [e.count > 1 ? "×" + num(e.count) : "1", "num"],
    ]);
    fillTable("events", rows);
  }

  function renderLimits(limits, workers) {
    const inForce = (limits.limits || []).filter((l) => l.mode !== "off");
    fillTable(
      "limits",
      inForce.map((l) => [
        l.option,
        [num(l.value), "num"],
        [badge(l.mode === "alarm" ? "alarm only" : "enforced", l.mode === "alarm" ? "warn" : "ok"), ""],
        [num(l.refused), "num"],
        [num(l.would_refuse), "num"],
      ])
    );
    text("limits-scope", workers > 1 ? "(counted per worker process; refusals summed over the workers)" : "");
    const other = [];
    const up = limits.upstream_limits || {};
    if (up.max_upstreams) other.push("--max-upstreams " + up.max_upstreams);
    if (up.max_upstreams_per_credential) other.push("--max-upstreams-per-credential " + up.max_upstreams_per_credential);
    const access = limits.access || {};
    if ((access.allow_cidr || []).length) other.push("--allow-cidr " + access.allow_cidr.join(", "));
    if ((access.deny_cidr || []).length) other.push("--deny-cidr " + access.deny_cidr.join(", "));
    if (access.authz_policy) other.push("--authz-policy set");
    if (inForce.length || other.length) {
      other.push("refused clients get their Connection.Close after " + limits.limit_refusal_delay_s + " s");
    }
    text("limits-other", other.join(" · "));
    const refused = Object.entries(limits.refused || {}).sort(([, a], [, b]) => b - a);
    fillTable("refusals", refused.map(([reason, n]) => [reason, [num(n), "num"]]));
  }

  function renderPaused(vhosts) {
    const list = $("paused");
    list.replaceChildren(...(vhosts.paused || []).map((v) => el("li", "", v)));
    $("paused-empty").hidden = list.children.length > 0;
  }

  function renderWorkers(health) {
    const workers = health.workers || [];
    $("workers-section").hidden = workers.length === 0;
    document.body.classList.toggle("single", workers.length === 0);
    const counter = $("worker-count");
    counter.hidden = workers.length === 0;
    const alive = workers.filter((w) => w.alive).length;
    counter.textContent = "workers " + alive + " / " + workers.length + " alive";
    fillTable(
      "workers",
      workers.map((w) => [
        w.worker,
        [w.pid ?? "–", "num"],
        [badge(w.alive ? "alive" : "down", w.alive ? "ok" : "bad"), ""],
        [num(w.restarts), "num"],
        duration(w.uptime_s),
      ])
    );
    return workers.length;
  }

  // ------------------------------------------------------------------ polling

  async function fetchJSON(name) {
    // From the origin, not relative: a page opened as http://user:token@host/ has a base URL
    // with credentials, which fetch() refuses; the browser sends the cached ones by itself.
    const response = await fetch(window.location.origin + "/" + name, {
      cache: "no-store",
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    });
    let body;
    try {
      body = await response.json();
    } catch (err) {
      throw new Error("/" + name + ": HTTP " + response.status + ", not JSON");
    }
    if (!response.ok && !ANY_STATUS.has(name)) {
      throw new Error("/" + name + ": HTTP " + response.status + (body && body.error ? " " + body.error : ""));
    }
    return body;
  }

  async function refresh() {
    try {
      const answers = await Promise.all(ENDPOINTS.map(fetchJSON));
      const data = Object.fromEntries(ENDPOINTS.map((name, i) => [name, answers[i]]));
      const workers = renderWorkers(data.healthz);
      renderHeader(data.healthz, data.readyz);
      renderTotals(data.stats);
      renderPools(data.stats);
      renderNodes(data.upstreams);
      renderEvents(data.upstreams);
      renderLimits(data.limits, workers);
      renderPaused(data.vhosts);
      $("problem").hidden = true;
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    } catch (err) {
      const problem = $("problem");
      problem.textContent = "Could not refresh (the numbers below may be stale): " + err.message;
      problem.hidden = false;
    } finally {
      window.setTimeout(refresh, INTERVAL_S * 1000);
    }
  }

  text("interval", String(INTERVAL_S));
  refresh();
})();
