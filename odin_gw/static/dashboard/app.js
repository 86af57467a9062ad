// Odin mesh dashboard: reads the admin JSON API with the admin token and renders it.
//
// The token lives in memory and in sessionStorage (gone with the tab); it is only ever
// sent as "Authorization: Bearer" on fetch calls to this gateway's admin API, never in a
// URL, a cookie or localStorage. Every value from the gateway is inserted as text
// (textContent / text nodes): service names and identities come from a mesh registry.
"use strict";

(() => {
  // The admin API's base: the directory above this script (/admin/ui/app.js -> /admin/).
  const BASE = new URL("../", document.currentScript.src);
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const ROUTES_EVERY = 5; // polls between two reads of /admin/routes
  const TAP_KEEP = 200; // tap events shown
  const TAP_MAX_LINE = 1 << 20;
  const STORE_KEY = "odin-admin-token";

  const $ = (id) => document.getElementById(id);

  let token = null;
  let generation = 0; // bumped at sign-out: answers of an older sign-in are dropped
  let pollTimer = null;
  let pollCount = 0;
  let previous = null; // {at, stats}: the last /admin/stats answer, for rates
  let routesByService = new Map();
  let tapController = null;
  let tapEvents = 0;

  class Unauthorized extends Error {}

  class HttpError extends Error {
    constructor(path, status, body) {
      const why = body && typeof body.error === "string" ? `: ${body.error}` : "";
      super(`${path}: HTTP ${status}${why}`);
      this.status = status;
    }
  }

  // -- talking to the admin API ---------------------------------------------------------
  function adminFetch(path, options = {}) {
    return fetch(new URL(path, BASE), {
      method: options.method || "GET",
      headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
      referrerPolicy: "no-referrer",
      signal: options.signal,
    });
  }

  async function getJSON(path, signal) {
    const response = await adminFetch(path, { signal });
    if (response.status === 401) throw new Unauthorized(path);
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (_) {
        // not JSON: the status says enough
      }
      throw new HttpError(path, response.status, body);
    }
    return response.json();
  }

  // An AbortController that fires after `ms`; `done()` cancels the timer.
  function deadline(ms) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(new Error("timed out")), ms);
    return { signal: controller.signal, done: () => clearTimeout(timer) };
  }

  function describe(error) {
    if (error && error.name === "AbortError") return "timed out";
    if (error && error.message) return error.message;
    return String(error);
  }

  // -- DOM helpers (text only) ----------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function text(value, fallback = "\u2014") {
    return value === null || value === undefined || value === "" ? fallback : String(value);
  }

  function seconds(value) {
    if (value === null || value === undefined) return "\u2014";
    const s = Number(value);
    if (Math.abs(s) < 120) return `${s.toFixed(1)} s`;
    if (Math.abs(s) < 7200) return `${(s / 60).toFixed(1)} min`;
    if (Math.abs(s) < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function rate(value) {
    return value === null ? "\u2026" : value.toFixed(2);
  }

  function setStatus(message, stale) {
    const status = $("poll-status");
    status.textContent = message;
    status.classList.toggle("stale", Boolean(stale));
  }

  // -- signing in and out -----------------------------------------------------------------
  function storeToken(value) {
    try {
      if (value) sessionStorage.setItem(STORE_KEY, value);
      else sessionStorage.removeItem(STORE_KEY);
    } catch (_) {
      // storage disabled: the token stays in memory only
    }
  }

  function storedToken() {
    try {
      return sessionStorage.getItem(STORE_KEY);
    } catch (_) {
      return null;
    }
  }

  function showSignIn(message) {
    $("sign-in").hidden = false;
    $("overview").hidden = true;
    $("tap").hidden = true;
    $("tabs").hidden = true;
    $("sign-out").hidden = true;
    const error = $("sign-in-error");
    error.textContent = message || "";
    error.hidden = !message;
    $("token").focus();
  }

  function showDashboard() {
    $("sign-in").hidden = true;
    $("sign-in-error").hidden = true;
    $("tabs").hidden = false;
    $("sign-out").hidden = false;
    selectTab("overview");
  }

  async function signIn(candidate) {
    generation += 1;
    token = candidate;
    const mine = generation;
    const limit = deadline(TIMEOUT_MS);
    $("sign-in-button").disabled = true;
    try {
      await getJSON("mesh", limit.signal);
    } catch (error) {
      if (mine !== generation) return;
      token = null;
      storeToken(null);
      if (error instanceof Unauthorized) {
        showSignIn("The gateway refused this token (401): check admin.token.");
      } else if (error instanceof HttpError && error.status === 403) {
        showSignIn("The admin API is disabled on this gateway (admin.token is not set).");
      } else {
        showSignIn(`Cannot reach the admin API: ${describe(error)}`);
      }
      return;
    } finally {
      limit.done();
      $("sign-in-button").disabled = false;
    }
    if (mine !== generation) return;
    storeToken(candidate);
    $("token").value = "";
    showDashboard();
    probeTap(mine);
    poll(mine);
  }

  function signOut(message) {
    generation += 1;
    token = null;
    storeToken(null);
    clearTimeout(pollTimer);
    pollTimer = null;
    stopTap("stopped: signed out");
    previous = null;
    pollCount = 0;
    routesByService = new Map();
    // Nothing read with the token stays on the page.
    $("mesh").replaceChildren();
    $("mesh-errors").hidden = true;
    $("services").replaceChildren();
    $("traffic").tBodies[0].replaceChildren();
    for (const id of ["total-rate", "total-error-rate", "total-requests", "total-errors"]) {
      $(id).textContent = "";
    }
    $("tap-events").tBodies[0].replaceChildren();
    $("tap-tab").hidden = true;
    setStatus("");
    showSignIn(message);
  }

  // -- polling ----------------------------------------------------------------------------
  // One poll at a time: the next one is scheduled when this one has finished.
  async function poll(mine) {
    if (mine !== generation || !token) return;
    const limit = deadline(TIMEOUT_MS);
    const wantRoutes = pollCount % ROUTES_EVERY === 0;
    pollCount += 1;
    try {
      const [services, mesh, stats, routes] = await Promise.all([
        getJSON("services", limit.signal),
        getJSON("mesh", limit.signal),
        getJSON("stats", limit.signal),
        wantRoutes ? getJSON("routes", limit.signal).catch(() => null) : null,
      ]);
      if (mine !== generation) return;
      if (routes) {
        routesByService = new Map(routes.routes.map((r) => [r.service, r]));
      }
      renderMesh(mesh);
      renderTraffic(stats, performance.now());
      renderServices(services);
      fillTapServices(services);
      setStatus(`Updated ${new Date().toLocaleTimeString()}`, false);
    } catch (error) {
      if (mine !== generation) return;
      if (error instanceof Unauthorized) {
        signOut("The gateway refused the token (401): sign in again.");
        return;
      }
      setStatus(`Update failed (${describe(error)}); retrying`, true);
    } finally {
      limit.done();
      if (mine === generation && token) {
        pollTimer = setTimeout(() => poll(mine), POLL_MS);
      }
    }
  }

  // -- mesh status ------------------------------------------------------------------------
  function fact(list, name, value, cls) {
    list.append(el("dt", {}, name), el("dd", { class: cls, "data-fact": name }, value));
  }

  function renderMesh(mesh) {
    const list = $("mesh");
    list.replaceChildren();
    fact(list, "Type", mesh.enabled ? text(mesh.type) : `${text(mesh.type)} (disabled)`);
    fact(
      list,
      "Ready",
      mesh.ready ? "ready" : `not ready: ${text(mesh.readyReason)}`,
      mesh.ready ? "ok" : "bad",
    );
    const leader = mesh.leader
      ? `this worker (pid ${mesh.pid})`
      : `pid ${text(mesh.leaderPid, "unknown")}`;
    fact(
      list,
      "Discovery leader",
      mesh.leaderStale ? `${leader}, heartbeat stale` : leader,
      mesh.leaderStale ? "bad" : null,
    );
    fact(list, "Snapshot age", seconds(mesh.snapshotAgeSeconds));
    fact(list, "Snapshot version", text(mesh.snapshotVersion));
    fact(list, "Last refresh", text(mesh.lastRefresh, "never"));
    fact(list, "Refresh interval", seconds(mesh.refreshInterval));
    fact(list, "Warm cache", mesh.warmCache ? "yes (from the state file)" : "no");
    const cert = mesh.certificate;
    if (cert && cert.notAfter) {
      const left = Number(cert.secondsLeft);
      const who = cert.spiffeId || cert.subject || "";
      fact(
        list,
        "Certificate",
        `${who} expires ${cert.notAfter} (${left > 0 ? "in " + seconds(left) : "expired"})`,
        left < 86400 ? "bad" : "ok",
      );
    } else {
      fact(list, "Certificate", cert ? `source ${text(cert.source)}` : "none");
    }
    const checks = mesh.healthChecks;
    if (checks && checks.endpoints) {
      const e = checks.endpoints;
      fact(
        list,
        "Health checks",
        `${e.passing} passing, ${e.failing} failing, ${e.unknown} unknown`,
        e.failing ? "bad" : null,
      );
    }
    const errors = [];
    if (mesh.lastError) {
      errors.push(
        `Discovery error (${mesh.consecutiveFailures} in a row): ${mesh.lastError}`,
      );
    }
    if (mesh.certificateError) errors.push(`Certificate error: ${mesh.certificateError}`);
    if (mesh.stateDirError) errors.push(`State directory error: ${mesh.stateDirError}`);
    const box = $("mesh-errors");
    box.textContent = errors.join("\n");
    box.hidden = errors.length === 0;
  }

  // -- traffic ----------------------------------------------------------------------------
  function rates(stats, at) {
    const out = new Map();
    const before = previous;
    const dt = before ? (at - before.at) / 1000 : 0;
    const per = (now, then) => (then !== undefined && now >= then && dt > 0 ? (now - then) / dt : null);
    for (const [name, s] of Object.entries(stats.services)) {
      const old = before ? before.stats.services[name] : undefined;
      out.set(name, {
        requests: per(s.requests, old && old.requests),
        errors: per(s.errors, old && old.errors),
      });
    }
    out.set(null, {
      requests: per(stats.total.requests, before && before.stats.total.requests),
      errors: per(stats.total.errors, before && before.stats.total.errors),
    });
    return out;
  }

  function renderTraffic(stats, at) {
    const r = rates(stats, at);
    previous = { at, stats };
    const body = $("traffic").tBodies[0];
    body.replaceChildren();
    for (const name of Object.keys(stats.services).sort()) {
      const s = stats.services[name];
      const classes = Object.entries(s.byStatusClass)
        .filter(([, n]) => n > 0)
        .map(([cls, n]) => `${cls} ${n}`)
        .join(" \u00b7 ");
      const rr = r.get(name);
      body.append(
        el(
          "tr",
          { "data-service": name },
          el("td", {}, name),
          el("td", { class: "num rate" }, rate(rr.requests)),
          el("td", { class: `num error-rate${rr.errors ? " bad" : ""}` }, rate(rr.errors)),
          el("td", { class: "num requests" }, s.requests),
          el("td", { class: `num errors${s.errors ? " bad" : ""}` }, s.errors),
          el("td", { class: "classes" }, classes || "\u2014"),
        ),
      );
    }
    const total = r.get(null);
    $("total-rate").textContent = rate(total.requests);
    $("total-error-rate").textContent = rate(total.errors);
    $("total-requests").textContent = String(stats.total.requests);
    $("total-errors").textContent = String(stats.total.errors);
  }

  // -- services and endpoints -------------------------------------------------------------
  function identityOf(target, service) {
    if (target.identity) return target.identity;
    if (target.identities && target.identities.length) return target.identities.join(" | ");
    if (service.sidecar && service.sidecar.requireIdentity) return service.sidecar.requireIdentity;
    return "\u2014";
  }

  function circuitOf(target) {
    if (!target.circuit) return "\u2014";
    const c = target.circuit;
    if (c.state === "open") return `open (retry in ${seconds(c.retryIn)})`;
    return text(c.state);
  }

  function passiveOf(target) {
    const p = target.passive;
    if (!p) return "\u2014";
    if (p.ejected) return `ejected ${seconds(p.ejectedFor)} (${text(p.reason)})`;
    return p.recentFailures ? `ok, ${p.recentFailures} recent failures` : "ok";
  }

  function endpointRow(target, service) {
    const where = target.datacenter || target.locality || null;
    const ejected = target.passive && target.passive.ejected;
    const circuitOpen = target.circuit && target.circuit.state === "open";
    return el(
      "tr",
      {
        "data-url": target.url,
        "data-instance": target.serviceId || null,
        class: target.healthy ? null : "down",
      },
      el("td", { class: "url" }, target.url),
      el("td", { class: "instance" }, text(target.serviceId || target.node)),
      el("td", { class: `health ${target.healthy ? "ok" : "bad"}` }, target.healthy ? "healthy" : "unhealthy"),
      el("td", { class: "mesh-status" }, text(target.status)),
      el(
        "td",
        { class: `check ${target.check && target.check.status === "failing" ? "bad" : ""}` },
        target.check ? target.check.status : "\u2014",
      ),
      el("td", { class: "where" }, text(where)),
      el("td", { class: "identity" }, identityOf(target, service)),
      el("td", { class: "num weight" }, text(target.weight)),
      el("td", { class: `circuit${circuitOpen ? " bad" : ""}` }, circuitOf(target)),
      el("td", { class: `passive${ejected ? " bad" : ""}` }, passiveOf(target)),
      el("td", { class: "active" }, target.active ? "yes" : "no"),
    );
  }

  function routeSummary(service) {
    const route = routesByService.get(service.name);
    if (!route) return null;
    const parts = [
      `balancing ${text(route.loadBalancing)}`,
      `timeout ${seconds(route.timeout)}`,
      `retries ${text(route.retries)}`,
    ];
    if (route.split && Array.isArray(route.split.groups)) {
      const groups = route.split.groups.map((g) => `${g.group} ${g.weight}`).join(", ");
      parts.push(`split ${groups}`);
    }
    return el("p", { class: "route" }, parts.join(" \u00b7 "));
  }

  function serviceFacts(service) {
    const facts = [
      `path ${text(service.basePath)}`,
      `source ${text(service.source)}`,
    ];
    if (service.meshService && service.meshService !== service.name) {
      facts.push(`mesh service ${service.meshService}`);
    }
    if (service.servingDatacenter) facts.push(`serving from ${service.servingDatacenter}`);
    if (service.sidecar) {
      const s = service.sidecar;
      facts.push(`via ${text(s.mode)} (${[].concat(s.url).join(", ")})`);
      if (s.dstOverride) facts.push(`l5d-dst-override ${s.dstOverride}`);
    }
    return facts.join(" \u00b7 ");
  }

  function serviceAlerts(service) {
    const alerts = [];
    if (service.panic) alerts.push("panic mode: routing to every endpoint, healthy or not");
    if (service.openCircuits && service.openCircuits.length) {
      alerts.push(`${service.openCircuits.length} open circuit(s)`);
    }
    if (service.ejected && service.ejected.length) {
      alerts.push(`${service.ejected.length} ejected endpoint(s)`);
    }
    return alerts;
  }

  function renderServices(doc) {
    $("services-worker").textContent = doc.services.length
      ? `(circuits and ejections as seen by worker ${doc.services[0].worker})`
      : "";
    const cards = doc.services.map((service) => {
      const healthy = service.targets.filter((t) => t.healthy).length;
      const head = el(
        "h3",
        {},
        service.name,
        el(
          "span",
          { class: `count ${healthy ? "ok" : "bad"}` },
          `${healthy}/${service.targets.length} healthy`,
        ),
      );
      const alerts = serviceAlerts(service);
      const rows = service.targets.map((t) => endpointRow(t, service));
      const table = el(
        "table",
        { class: "grid endpoints" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            ...[
              "Endpoint",
              "Instance",
              "Health",
              "Mesh",
              "Check",
              "Datacenter / zone",
              "Identity",
              "Weight",
              "Circuit",
              "Outlier",
              "In pool",
            ].map((h) => el("th", {}, h)),
          ),
        ),
        el("tbody", {}, ...rows),
      );
      return el(
        "article",
        { class: "service", "data-service": service.name },
        head,
        el("p", { class: "facts-line" }, serviceFacts(service)),
        routeSummary(service),
        alerts.length ? el("p", { class: "error" }, alerts.join("; ")) : null,
        rows.length ? table : el("p", { class: "hint" }, "No endpoints."),
      );
    });
    $("services").replaceChildren(...cards);
  }

  // -- tabs -------------------------------------------------------------------------------
  function selectTab(name) {
    for (const tab of document.querySelectorAll(".tab")) {
      tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
    }
    $("overview").hidden = name !== "overview";
    $("tap").hidden = name !== "tap";
  }

  // -- live tap ---------------------------------------------------------------------------
  // HEAD /admin/tap answers 404 when the tap is off, 200 (opening nothing) when it is on.
  async function probeTap(mine) {
    const limit = deadline(TIMEOUT_MS);
    try {
      const response = await adminFetch("tap", { method: "HEAD", signal: limit.signal });
      if (mine === generation) $("tap-tab").hidden = response.status === 404;
    } catch (_) {
      // unknown: leave the tab hidden
    } finally {
      limit.done();
    }
  }

  function fillTapServices(doc) {
    const select = $("tap-service");
    const names = doc.services.map((s) => s.name);
    const have = Array.from(select.options).slice(1).map((o) => o.value);
    if (names.join("\n") === have.join("\n")) return;
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "(all proxied)"));
    for (const name of names) select.append(el("option", { value: name }, name));
    select.value = names.includes(chosen) ? chosen : "";
  }

  function tapStatus(message) {
    $("tap-status").textContent = message;
  }

  function stopTap(message) {
    if (tapController) {
      tapController.abort();
      tapController = null;
      tapStatus(message || "stopped");
    }
    $("tap-start").disabled = false;
    $("tap-stop").disabled = true;
  }

  function showTapEvent(event) {
    const body = $("tap-events").tBodies[0];
    const row = el(
      "tr",
      { class: event.status >= 500 ? "down" : null },
      el("td", {}, text(event.time)),
      el("td", {}, text(event.service)),
      el("td", {}, text(event.method)),
      el("td", { class: "url" }, text(event.path)),
      el("td", { class: "url" }, text(event.endpoint)),
      el("td", { class: "num" }, text(event.status)),
      el("td", { class: "num" }, text(event.durationMs)),
      el("td", { class: "num" }, text(event.bytes)),
      el("td", {}, text(event.peerIdentity)),
    );
    body.prepend(row);
    while (body.rows.length > TAP_KEEP) body.deleteRow(-1);
  }

  async function startTap() {
    stopTap();
    const mine = generation;
    const controller = new AbortController();
    tapController = controller;
    const query = new URLSearchParams();
    const service = $("tap-service").value;
    const path = $("tap-path").value.trim();
    if (service) query.set("service", service);
    if (path) query.set("path", path);
    $("tap-start").disabled = true;
    $("tap-stop").disabled = false;
    $("tap-events").tBodies[0].replaceChildren();
    tapEvents = 0;
    let dropped = 0;
    tapStatus("connecting\u2026");
    try {
      const response = await adminFetch(`tap?${query}`, { signal: controller.signal });
      if (response.status === 401) {
        signOut("The gateway refused the token (401): sign in again.");
        return;
      }
      if (response.status === 404) {
        $("tap-tab").hidden = true;
        selectTab("overview");
        stopTap("the tap is off on this gateway");
        return;
      }
      if (response.status === 429) {
        stopTap("too many taps open (linkerd.maxTaps): try again later");
        return;
      }
      if (!response.ok) {
        stopTap(`tap refused: HTTP ${response.status}`);
        return;
      }
      tapStatus("streaming");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, cut).trim();
          buffer = buffer.slice(cut + 1);
          if (!line) continue;
          const event = JSON.parse(line);
          if (typeof event.dropped === "number" && event.requestId === undefined) {
            dropped = event.dropped;
          } else if (service || event.service !== null) {
            // "all proxied": the gateway's own answers (this page's polls) are skipped
            tapEvents += 1;
            showTapEvent(event);
          }
          tapStatus(`streaming: ${tapEvents} events${dropped ? `, ${dropped} dropped` : ""}`);
        }
        if (buffer.length > TAP_MAX_LINE) throw new Error("tap line too long");
      }
      if (tapController === controller) stopTap(`ended: ${tapEvents} events`);
    } catch (error) {
      if (mine !== generation || tapController !== controller) return; // stopped on purpose
      stopTap(`tap failed: ${describe(error)}`);
    }
  }

  // -- wiring -----------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const value = $("token").value.trim();
      if (value) signIn(value);
    });
    $("sign-out").addEventListener("click", () => signOut(""));
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => selectTab(tab.dataset.tab));
    }
    $("tap-form").addEventListener("submit", (event) => {
      event.preventDefault();
      startTap();
    });
    $("tap-stop").addEventListener("click", () => stopTap("stopped"));
    const remembered = storedToken();
    if (remembered) signIn(remembered);
    else showSignIn("");
  });
})();
