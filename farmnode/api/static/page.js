// The status page: the node and its tasks from GET /api/v1/events (server-sent events),
// task details from GET /api/v1/tasks, a task's log tail from GET /api/v1/task_logs.
// Same origin only: the browser sends the credentials it was asked for at the page.
"use strict";

const LOG_LINES = 200;
const LOG_REFRESH_MS = 1000; // at most one log request a second while output flows
const KEPT_FINISHED = 50; // finished tasks kept on the page, newest first
const FINISHED = new Set(["done", "failed", "cancelled"]);

const tasks = new Map(); // task id -> {id, frame, job, assignment_id, state, reason, progress}
const rows = new Map(); // task id -> its <li>
let selected = null;
let logTimer = null;
let logLoading = false;
let tasksLoading = null;
let tasksAgain = null; // null, or whether the load asked for meanwhile is a fresh one

const $ = (id) => document.getElementById(id);
// Absolute, from the origin: a page opened with credentials in its address has a base URL
// that fetch() refuses to resolve a relative URL against.
const url = (path) => location.origin + path;

let lastError = ""; // of the page's own requests
let nodeProblem = ""; // the node's own (its storage)

function showError(text) {
  const el = $("error");
  el.textContent = text || nodeProblem;
  el.hidden = !el.textContent;
}

async function getJSON(path) {
  const r = await fetch(url(path), {headers: {Accept: "application/json"}, cache: "no-store"});
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error || why; } catch (e) { /* not JSON */ }
    throw new Error(`${path}: ${r.status} ${why}`);
  }
  return r.json();
}

function mib(mb) {
  return mb >= 1024 ? `${(mb / 1024).toFixed(1)} GiB` : `${mb} MiB`;
}

function renderNode(n) {
  if (n.agent_hostname) {
    $("host").textContent = n.agent_hostname;
    document.title = `farmnode: ${n.agent_hostname}`;
  }
  if (n.state) renderState(n.state);
  if (typeof n.ram === "number" && typeof n.free_ram === "number") {
    const used = Math.max(0, n.ram - n.free_ram);
    const pct = n.ram > 0 ? Math.min(100, Math.round((100 * used) / n.ram)) : 0;
    $("ram").textContent = `${mib(n.free_ram)} free of ${mib(n.ram)}`;
    $("ram-fill").style.width = `${pct}%`;
    $("ram-fill").parentElement.setAttribute("aria-valuenow", String(pct));
  }
  if (n.cpus != null) $("cpus").textContent = String(n.cpus);
  if (n.version) $("version").textContent = n.version;
  const link = n.master_link;
  $("master").textContent = !link ? "none (standalone)"
    : `${link.master || "?"}: ${link.last_error ? `error: ${link.last_error}`
      : link.announced ? "announced" : "not announced yet"}` +
      (link.queued_reports ? `, ${link.queued_reports} reports queued` : "");
  nodeProblem = n.storage_error ? `The state directory refuses writes: ${n.storage_error}` : "";
  showError(lastError || nodeProblem);
  const running = n.running_tasks ?? 0;
  const assignments = (n.assignments || []).length;
  $("running").textContent = `${running} in ${assignments} assignment${assignments === 1 ? "" : "s"}`;
  const gpus = $("gpus");
  gpus.replaceChildren();
  for (const g of n.gpus || []) {
    const li = document.createElement("li");
    li.textContent = `${g.name || g.id}: ${g.assignment ? `assignment ${g.assignment}` : "free"}`;
    gpus.append(li);
  }
  if (!gpus.children.length) {
    const li = document.createElement("li");
    li.textContent = "none";
    gpus.append(li);
  }
}

function renderState(state) {
  const el = $("state");
  el.textContent = state;
  el.className = `badge ${state}`;
}

function rowOf(id) {
  let li = rows.get(id);
  if (li) return li;
  li = document.createElement("li");
  li.dataset.task = String(id);
  const button = document.createElement("button");
  button.type = "button";
  const head = document.createElement("span");
  head.className = "task-head";
  const name = document.createElement("span");
  name.className = "task-name";
  const state = document.createElement("span");
  state.className = "task-state";
  head.append(name, state);
  const bar = document.createElement("div");
  bar.className = "bar";
  bar.setAttribute("role", "progressbar");
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", "100");
  bar.setAttribute("aria-valuenow", "0");
  const fill = document.createElement("div");
  fill.className = "fill";
  bar.append(fill);
  const reason = document.createElement("div");
  reason.className = "reason";
  button.append(head, bar, reason);
  button.addEventListener("click", () => select(id));
  li.append(button);
  rows.set(id, li);
  return li;
}

function renderTask(t) {
  const li = rowOf(t.id);
  const pct = Math.round(100 * Math.min(1, Math.max(0, t.progress || 0)));
  li.className = `${t.state || "queued"}${selected === t.id ? " selected" : ""}`;
  const frame = t.frame != null ? ` · frame ${t.frame}` : "";
  const job = t.job != null ? ` · job ${t.job}` : "";
  li.querySelector(".task-name").textContent = `Task ${t.id}${frame}${job}`;
  li.querySelector(".task-state").textContent = `${t.state} · ${pct}\u00a0%`;
  const bar = li.querySelector(".bar");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.setAttribute("aria-label", `task ${t.id} progress`);
  bar.firstChild.style.width = `${pct}%`;
  li.querySelector(".reason").textContent = t.reason || "";
}

function renderList() {
  const order = [...tasks.values()].sort((a, b) => {
    const fa = FINISHED.has(a.state), fb = FINISHED.has(b.state);
    return fa === fb ? b.id - a.id : fa ? 1 : -1;
  });
  let finished = 0;
  for (const t of order) {
    if (FINISHED.has(t.state) && ++finished > KEPT_FINISHED && t.id !== selected) {
      tasks.delete(t.id);
      rows.get(t.id)?.remove();
      rows.delete(t.id);
    }
  }
  const list = $("tasks");
  for (const t of order) if (tasks.has(t.id)) list.append(rowOf(t.id));
  $("no-tasks").hidden = tasks.size > 0;
}

// `fill`: only what the page lacks (a lookup may answer older than the events since).
function merge(t, fill = false) {
  const old = tasks.get(t.id) || {};
  const merged = {...old};
  for (const [k, v] of Object.entries(t)) {
    if (fill && old[k] !== undefined) continue;
    // a source that does not know a field (null) keeps what another one said of it
    if (v !== undefined && (v !== null || k === "reason")) merged[k] = v;
  }
  tasks.set(t.id, merged);
  renderTask(merged);
  return merged;
}

// The running tasks with their frame and job; tasks the page knows that are no longer
// running keep what events said of them. `fresh`: the stream (re)opened, so the list is
// newer than anything the page has; else it only fills in what events do not carry.
function loadTasks(fresh = false) {
  if (tasksLoading) { // its answer may predate what asked now: ask again after it
    tasksAgain = tasksAgain === null ? fresh : tasksAgain || fresh;
    return;
  }
  tasksLoading = getJSON("/api/v1/tasks/").then((list) => {
    for (const t of list) {
      merge({id: t.id, frame: t.frame, job: t.job_id ?? t.job, assignment_id: t.assignment_id,
             state: t.local_state, reason: t.reason, progress: t.progress}, !fresh);
    }
    renderList();
    if (selected === null && list.length) select(list[0].id);
    lastError = "";
    showError("");
  }).catch((e) => {
    lastError = String(e.message || e);
    showError(lastError);
  }).finally(() => {
    tasksLoading = null;
    const again = tasksAgain;
    tasksAgain = null;
    if (again !== null) loadTasks(again);
  });
}

function onTask(data) {
  const known = tasks.has(data.task_id);
  const t = merge({id: data.task_id, assignment_id: data.assignment_id, state: data.state,
                   reason: data.reason, progress: data.progress});
  if (!known) {
    renderList();
    loadTasks(); // its frame and job
  } else if (FINISHED.has(t.state)) {
    renderList();
  }
  if (selected === null) select(t.id); // the first task the page hears of
  else if (selected === t.id) scheduleLog(FINISHED.has(t.state));
}

function select(id) {
  const before = selected;
  selected = id;
  if (before !== null && tasks.has(before)) renderTask(tasks.get(before));
  if (tasks.has(id)) renderTask(tasks.get(id));
  $("log-task").textContent = `of task ${id}`;
  $("log").textContent = "…";
  scheduleLog(true);
}

function scheduleLog(now) {
  if (now) {
    clearTimeout(logTimer);
    logTimer = null;
    loadLog();
  } else if (logTimer === null) {
    logTimer = setTimeout(() => { logTimer = null; loadLog(); }, LOG_REFRESH_MS);
  }
}

async function loadLog() {
  if (selected === null) return;
  if (logLoading) { scheduleLog(false); return; }
  const id = selected;
  logLoading = true;
  try {
    const r = await fetch(url(`/api/v1/task_logs/${encodeURIComponent(id)}?format=text&tail=${LOG_LINES}`),
                          {headers: {Accept: "text/plain"}, cache: "no-store"});
    const text = r.ok ? await r.text() : `${r.status} ${r.statusText}: ${await r.text()}`;
    if (id !== selected) return;
    const log = $("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent = text || "(no output yet)";
    if (atEnd) log.scrollTop = log.scrollHeight;
  } catch (e) {
    if (id === selected) $("log").textContent = String(e.message || e);
  } finally {
    logLoading = false;
  }
}

function connect() {
  const link = $("link");
  const events = new EventSource(url("/api/v1/events"));
  events.addEventListener("open", () => {
    lastError = "";
    showError("");
    link.textContent = "live";
    link.className = "link live";
    loadTasks(true); // after a reconnect: what changed while the stream was away
  });
  events.addEventListener("error", () => {
    link.textContent = "reconnecting";
    link.className = "link";
    // Refused (401, 503 with too many streams open): the browser gives up; so do we, then
    // try again later. A dropped stream the browser reopens itself.
    if (events.readyState === EventSource.CLOSED) {
      lastError = "the event stream was refused; trying again in 5 s";
      showError(lastError);
      setTimeout(connect, 5000);
    }
  });
  events.addEventListener("agent", (e) => renderState(JSON.parse(e.data).state));
  events.addEventListener("node", (e) => renderNode(JSON.parse(e.data)));
  events.addEventListener("task", (e) => onTask(JSON.parse(e.data)));
}

connect();
