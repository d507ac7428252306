// The dashboard: a hash router over three sections (overview, jobs, VMs) and a job's page.
// Each view fetches what it shows from the REST API and refreshes itself while visible.

import { api, ApiError, health, optional, trouble } from "./api.js";
import { ago, badge, between, bytes, details, duration, fill, h, meter, table } from "./dom.js";
import { LogView } from "./logview.js";

const REFRESH_MS = 3000;
const PAGE_SIZE = 50;
const STATES = ["queued", "assigned", "booting", "running", "succeeded", "failed", "errored", "cancelled", "timed_out"];
const ENDED = new Set(["succeeded", "failed", "errored", "cancelled", "timed_out"]);

const main = document.getElementById("main");
let me = { name: document.getElementById("who")?.textContent ?? "", scopes: [] };
let current = null; // the view on screen: {stop()}

function can(scope) {
  return me.scopes.includes(scope) || me.scopes.includes("admin");
}

/** Run `load` now and every REFRESH_MS while the view is on screen and the tab visible. */
function every(load) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await load();
      } catch (err) {
        if (!(err instanceof ApiError)) console.debug(err);
      }
    }
    if (!stopped) timer = setTimeout(tick, REFRESH_MS);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function shortId(id) {
  return h("a", { href: `#/jobs/${id}`, class: "mono", title: id }, id.slice(0, 12));
}

function commandText(command) {
  return (command ?? []).map((arg) => (/^[\w@%+=:,./-]+$/.test(arg) ? arg : JSON.stringify(arg))).join(" ");
}

function failure(err) {
  return h("p", { class: "alert", role: "alert" }, err instanceof Error ? err.message : String(err));
}

// --- overview -----------------------------------------------------------------------------------

function overview() {
  const root = h("div", { class: "overview" }, h("h1", {}, "Overview"));
  const healthLine = h("p", { class: "health" });
  const hosts = h("div");
  const pools = h("div");
  const stats = h("div");
  const ci = h("div");
  root.append(healthLine, hosts, pools, stats, ci);
  fill(main, root);

  const stop = every(async () => {
    const [healthView, hostList, poolList, statView, integrations] = await Promise.all([
      health(),
      api("/v1/hosts"),
      api("/v1/pools"),
      optional("/v1/stats"),
      optional("/v1/integrations"),
    ]);
    if (healthView) {
      fill(healthLine, "This host (", healthView.host, ") is ", badge(healthView.status),
        healthView.detail ? ` — ${healthView.detail}` : "", ` · ${healthView.running} jobs running`);
    }
    fill(
      hosts,
      table(
        "Hosts",
        ["Host", "Status", "vCPUs in use", "Memory in use", "Heartbeat", "Version"],
        hostList.map((host) => [
          host.name,
          [badge(host.alive ? host.status : "gone")],
          meter(`vCPUs in use on ${host.name}`, host.used_cpus, host.cpu_budget ?? host.cpus),
          meter(`memory in use on ${host.name}`, host.used_memory_mb, host.memory_budget_mb ?? host.memory_mb, (mb) => bytes(mb * 1048576)),
          ago(host.heartbeat_at),
          host.version,
        ]),
        { empty: "No host has registered.", id: "hosts" },
      ),
    );
    fill(
      pools,
      table(
        "Pools",
        ["Pool", "Image", "Shape", "Idle", "Booting", "Busy", "Max", "Queued"],
        poolList.map((pool) => [
          h("a", { href: `#/jobs?pool=${encodeURIComponent(pool.name)}` }, pool.name),
          // A flake pool: the built image's name, the flake base on hover.
          pool.image_base ? h("span", { title: pool.image_base }, pool.image) : pool.image,
          `${pool.cpus} vCPU · ${bytes(pool.memory_mb * 1048576)}`,
          pool.idle,
          pool.warming,
          pool.busy,
          pool.max,
          pool.queued,
        ]),
        { empty: "No pools are configured.", id: "pools" },
      ),
    );
    if (statView) {
      const windowText = duration(statView.window_s);
      const finished = Object.entries(statView.finished ?? {});
      fill(
        stats,
        table(
          `Jobs finished in the last ${windowText}`,
          ["Outcome", "Jobs"],
          finished.map(([state, n]) => [
            h("a", { href: `#/jobs?state=${encodeURIComponent(state)}` }, badge(state)),
            n,
          ]),
          { empty: `No job finished in the last ${windowText}.`, id: "finished" },
        ),
      );
      const causes = Object.entries(statView.by_cause ?? {}).filter(([, n]) => n);
      if (causes.length) {
        stats.append(h("p", { class: "muted" }, "How they ended: ", causes.map(([cause, n]) => `${n} ${cause}`).join(", "), "."));
      }
    }
    if (integrations) {
      fill(ci, integrationsTable(integrations));
    }
  });
  return { stop };
}

function integrationsTable(integrations) {
  return table(
    "CI integrations",
    ["Integration", "Targets", "Runners", "API budget left", "Last webhook", "Last pass", "Last correction", "Last error"],
    integrations.map((item) => [
      item.leader ? `${item.name} (leader)` : item.name,
      (item.targets ?? []).join(", ") || "—",
      Object.entries(item.runners ?? {}).filter(([, n]) => n).map(([state, n]) => `${n} ${state}`).join(", ") || "none live",
      item.rate_limit_remaining ?? "—",
      item.last_webhook_at ? ago(item.last_webhook_at) : "never",
      item.last_pass_at ? ago(item.last_pass_at) : "never",
      item.last_correction ? [item.last_correction.kind, " ", ago(item.last_correction.at)] : "none",
      item.last_error ?? "—",
    ]),
    { empty: "No CI integration is configured.", id: "integrations" },
  );
}

// --- jobs ---------------------------------------------------------------------------------------

function jobsView(query) {
  const filters = {
    state: query.get("state") ?? "",
    pool: query.get("pool") ?? "",
    submitter: query.get("submitter") ?? "",
    label: query.get("label") ?? "",
  };
  // Paging goes back through the cursors that led here (kept in the address, so it reloads).
  const trail = (query.get("trail") ?? "").split(",").filter((c) => /^[0-9a-f]{32}$/.test(c));
  const before = trail.at(-1) ?? null;

  const field = (name, label, control) =>
    h("div", { class: "field" }, h("label", { for: `filter-${name}` }, label), control);
  const stateSelect = h(
    "select",
    { id: "filter-state", name: "state" },
    h("option", { value: "" }, "any"),
    STATES.map((s) => h("option", { value: s, selected: s === filters.state }, s)),
  );
  const poolSelect = h("select", { id: "filter-pool", name: "pool" }, h("option", { value: "" }, "any"));
  if (filters.pool) poolSelect.append(h("option", { value: filters.pool, selected: true }, filters.pool));
  const submitter = h("input", { id: "filter-submitter", name: "submitter", value: filters.submitter, autocomplete: "off" });
  const label = h("input", { id: "filter-label", name: "label", value: filters.label, autocomplete: "off" });
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs" },
    field("state", "State", stateSelect),
    field("pool", "Pool", poolSelect),
    field("submitter", "Submitter", submitter),
    field("label", "Label", label),
    h("button", { type: "submit" }, "Filter"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [key, value] of new FormData(form)) if (value) next.set(key, String(value));
    location.hash = `#/jobs${next.size ? `?${next}` : ""}`;
  });
  const list = h("div", { "aria-live": "polite", "aria-busy": "true" });
  const pager = h("nav", { class: "pager", "aria-label": "Pages of jobs" });
  fill(main, h("h1", {}, "Jobs"), form, list, pager);

  api("/v1/pools")
    .then((pools) => {
      for (const pool of pools) {
        if (pool.name !== filters.pool) poolSelect.append(h("option", { value: pool.name }, pool.name));
      }
    })
    .catch(() => {});

  const link = (nextTrail) => {
    const next = new URLSearchParams();
    for (const [key, value] of Object.entries(filters)) if (value) next.set(key, value);
    if (nextTrail.length) next.set("trail", nextTrail.join(","));
    return `#/jobs${next.size ? `?${next}` : ""}`;
  };

  const stop = every(async () => {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    for (const [key, value] of Object.entries(filters)) if (value) params.set(key, value);
    if (before) params.set("before", before);
    let page;
    try {
      page = await api(`/v1/jobs?${params}`);
    } catch (err) {
      if (err instanceof ApiError) fill(list, failure(err));
      throw err;
    }
    list.setAttribute("aria-busy", "false");
    fill(
      list,
      table(
        "Jobs, newest first",
        ["Job", "State", "Pool", "Submitter", "Command", "Created", "Took"],
        page.jobs.map((job) => [
          shortId(job.id),
          [badge(job.state)],
          job.pool ?? "—",
          job.submitter,
          h("code", { class: "command" }, commandText(job.command)),
          ago(job.created_at),
          duration(between(job.started_at ?? job.created_at, job.finished_at)),
        ]),
        { empty: "No job matches.", id: "jobs" },
      ),
    );
    fill(
      pager,
      trail.length ? h("a", { href: link(trail.slice(0, -1)), rel: "prev" }, "← Newer") : null,
      page.next_before ? h("a", { href: link([...trail, page.next_before]), rel: "next" }, "Older →") : null,
    );
  });
  return { stop };
}

// --- one job ------------------------------------------------------------------------------------

function timeline(events) {
  return h(
    "ol",
    { class: "timeline", "aria-label": "State changes" },
    events.map((event) =>
      h(
        "li",
        {},
        badge(event.to_state),
        " ",
        ago(event.at),
        event.attempt > 0 ? ` (attempt ${event.attempt + 1})` : "",
        event.host ? ` on ${event.host}` : "",
        event.reason ? h("span", { class: "reason" }, ` — ${event.reason}`) : "",
      ),
    ),
  );
}

function networkSection(job) {
  if (!job.network && !job.network_summary) return null;
  const policy = job.network;
  const summary = job.network_summary;
  const counts = summary?.connections;
  return h(
    "section",
    { "aria-labelledby": "network-title" },
    h("h2", { id: "network-title" }, "Network"),
    details([
      ["Policy", policy ? policy.mode : "the image's own"],
      ["Allowed destinations", policy?.allow?.length ? policy.allow.join(", ") : null],
      ["Connections", counts ? `${counts.allowed} allowed, ${counts.denied} denied, ${counts.errors} failed` : null],
      ["Traffic", counts ? `${bytes(counts.bytes_up)} up, ${bytes(counts.bytes_down)} down` : null],
    ]),
    summary?.denied?.length
      ? h("div", {}, h("h3", {}, "Denied connections"), h("ul", { class: "denied" }, summary.denied.map((d) => h("li", { class: "mono" }, d))))
      : null,
  );
}

/** A download link for an artifact; a name the browser would resolve elsewhere (a "." or
 * ".." segment: the guest chose it) is shown without one. */
function artifactLink(jobId, name) {
  const segments = name.split("/");
  if (segments.some((part) => part === "" || part === "." || part === "..")) return name;
  return h("a", { href: `/v1/jobs/${jobId}/artifacts/${segments.map(encodeURIComponent).join("/")}`, download: "" }, name);
}

function jobView(jobId) {
  const head = h("div", { class: "job-head" });
  const body = h("div");
  const artifacts = h("div");
  const status = h("p", { class: "muted", role: "status" });
  const logs = new LogView(jobId, {
    onEnd: () => refresh(),
    onStatus: (text) => trouble("logs", text),
  });
  fill(main, head, status, body, logs.element, artifacts);
  let job = null;
  let artifactsShown = false;

  async function cancel(button) {
    if (!window.confirm(`Cancel job ${jobId}? Its VM is destroyed.`)) return;
    button.disabled = true;
    try {
      job = await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
      status.textContent = "Cancelled.";
      render();
    } catch (err) {
      status.textContent = `Could not cancel: ${err.message}`;
      button.disabled = false;
    }
  }

  function render() {
    const ended = ENDED.has(job.state);
    const mayCancel = !ended && can("submit") && (job.submitter === me.name || can("admin"));
    const button = mayCancel ? h("button", { type: "button", class: "danger", id: "cancel" }, "Cancel job") : null;
    button?.addEventListener("click", () => cancel(button));
    fill(
      head,
      h("h1", {}, "Job ", h("span", { class: "mono" }, job.id)),
      h("p", { class: "job-state" }, badge(job.state), job.cancel_requested && !ended ? " (cancel requested)" : "", " ", button),
    );
    fill(
      body,
      details([
        ["Command", h("code", { class: "command" }, commandText(job.command))],
        ["Image", job.image],
        ["Pool", job.pool],
        ["Shape", `${job.cpus} vCPU · ${bytes(job.memory_mb * 1048576)} memory · ${bytes(job.disk_mb * 1048576)} disk`],
        ["Submitter", job.submitter],
        ["Labels", job.labels?.length ? job.labels.join(", ") : null],
        ["Source", job.source?.kind === "git" ? `${job.source.url} @ ${job.source.ref}` : job.source?.kind],
        ["Environment", Object.keys(job.env ?? {}).length ? Object.entries(job.env).map(([k, v]) => `${k}=${v}`).join(" ") : null],
        ["Secrets", Object.keys(job.secrets ?? {}).length ? Object.entries(job.secrets).map(([k, v]) => `${k}=${v}`).join(" ") : null],
        ["Attempts", job.started_at ? String(job.attempt + 1) : null],
        ["Host / VM", job.host ? `${job.host} / ${job.vm_name ?? "—"}` : null],
        ["Exit", job.exit_code !== null ? `status ${job.exit_code}` : job.signal !== null ? `signal ${job.signal}` : null],
        ["Cause", job.cause],
        ["Reason", job.reason],
        ["Took", job.started_at ? duration(between(job.started_at, job.finished_at)) : null],
      ]),
      h("section", { "aria-labelledby": "timeline-title" }, h("h2", { id: "timeline-title" }, "Timeline"), timeline(job.events ?? [])),
      networkSection(job),
    );
    if (ended && !artifactsShown) {
      artifactsShown = true;
      loadArtifacts();
    }
  }

  async function loadArtifacts() {
    if (!job.artifacts?.length) return;
    try {
      const list = await api(`/v1/jobs/${jobId}/artifacts`);
      fill(
        artifacts,
        table(
          "Artifacts",
          ["File", "Size", "SHA-256"],
          list.artifacts.map((a) => [
            artifactLink(jobId, a.name),
            bytes(a.size),
            h("code", { class: "digest" }, a.sha256),
          ]),
          { empty: "The job's artifact patterns matched no file.", id: "artifacts" },
        ),
      );
    } catch (err) {
      fill(artifacts, failure(err));
    }
  }

  async function refresh() {
    try {
      job = await api(`/v1/jobs/${jobId}`);
    } catch (err) {
      if (err instanceof ApiError) {
        fill(head, h("h1", {}, "Job ", h("span", { class: "mono" }, jobId)), failure(err));
        logs.close();
      }
      throw err;
    }
    render();
  }

  const stop = every(async () => {
    if (job && ENDED.has(job.state)) return;
    await refresh();
    if (!logs.source) logs.start();
  });
  return {
    stop() {
      stop();
      logs.close();
      trouble("logs", null);
    },
  };
}

// --- VMs ----------------------------------------------------------------------------------------

function vmsView() {
  const live = h("div");
  const failed = h("section", { "aria-labelledby": "failed-title" });
  fill(main, h("h1", {}, "VMs"), live, failed);
  const stop = every(async () => {
    const [vms, broken] = await Promise.all([api("/v1/vms"), optional("/v1/vms/failed")]);
    fill(
      live,
      table(
        "VMs on every host",
        ["VM", "Host", "Pool", "State", "Age", "Job", "Shape"],
        vms.map((vm) => [
          h("span", { class: "mono" }, vm.name),
          vm.host,
          vm.pool,
          [badge(vm.state)],
          duration(between(vm.created_at)),
          vm.job_id ? shortId(vm.job_id) : "—",
          vm.cpus ? `${vm.cpus} vCPU · ${bytes(vm.memory_mb * 1048576)}` : "—",
        ]),
        { empty: "No VM is running.", id: "vms" },
      ),
    );
    if (broken === null) return;
    const items = broken.vms ?? broken;
    const open = new Set([...failed.querySelectorAll("details[open]")].map((d) => d.dataset.id));
    fill(
      failed,
      h("h2", { id: "failed-title" }, "Recently failed VMs"),
      items.length
        ? items.map((vm) =>
            h(
              "details",
              { dataset: { id: String(vm.id) }, open: open.has(String(vm.id)) },
              h("summary", {}, h("span", { class: "mono" }, vm.vm_name), ` (${vm.pool}) on ${vm.host}, `, ago(vm.failed_at), ": ", vm.reason),
              vm.job_id ? h("p", {}, "Job ", shortId(vm.job_id)) : null,
              h("pre", { class: "console", tabindex: 0, "aria-label": `Console of ${vm.vm_name}` }, vm.console || "(the console was empty)"),
            ),
          )
        : h("p", { class: "muted" }, "No VM has failed recently."),
    );
  });
  return { stop };
}

// --- the router ---------------------------------------------------------------------------------

function route() {
  current?.stop();
  trouble("logs", null);
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = hash.split("?");
  const query = new URLSearchParams(search);
  const job = path.match(/^\/jobs\/([0-9a-f]{32})$/);
  let section = "overview";
  if (job) {
    current = jobView(job[1]);
    section = "jobs";
  } else if (path === "/jobs") {
    current = jobsView(query);
    section = "jobs";
  } else if (path === "/vms") {
    current = vmsView();
    section = "vms";
  } else {
    current = overview();
  }
  for (const link of document.querySelectorAll("nav a[data-section]")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${section === "vms" ? "VMs" : section[0].toUpperCase() + section.slice(1)} · stoker`;
}

async function start() {
  try {
    me = await api("/v1/whoami");
  } catch {
    /* the banner says why; views retry on their own */
  }
  // The skip link moves focus only: "#main" must not reach the hash router.
  document.querySelector(".skip")?.addEventListener("click", (event) => {
    event.preventDefault();
    main.focus();
  });
  window.addEventListener("hashchange", () => {
    route();
    main.focus();
  });
  route();
}

start();
