// The pgjobs dashboard: the company's jobs, live from its event stream.
//
// Data comes from the gateway's JSON API (Authorization: Bearer, with the token typed in
// and held in sessionStorage) and its event streams (EventSource with a short-lived
// stream token). Every value that came from a job is put in the page as text
// (textContent), never as markup.
//
// Live rows: the company stream sends every transition of the company's jobs; each
// carries the job's `seq`, and a row takes an event only if its seq is newer than the
// row's (records from the list API carry `seq` too), so an event replayed after a
// reconnect, or one older than a freshly listed record, never moves a row back. A job the
// page has not listed yet is fetched once and inserted. EventSource resumes with
// Last-Event-ID by itself; when it gives up (its stream token expired), a new stream
// starts from now and the listed jobs are read again. Renders are coalesced to at most
// one every RENDER_MS.
//
// Times: events carry no time, and a job's startedAt / finishedAt are the times its
// transition wrote to the row (which can differ from the event's own time). So a row that
// an event moves to running or to an end is read again for its times: the status changes
// at once, the times follow.
//
// Reads are batched: jobs the page needs a record of (new ones, and rows that need their
// times) are gathered and read at most once every FLUSH_MS, one by one when they are a
// few, and otherwise by reading the listed pages again (at most PAGE_SIZE per page
// listed, whatever the number of events), so a burst of thousands of events a second
// costs a request or two a second, not one per job.
"use strict";

(() => {
  const RENDER_MS = 100;
  const FLUSH_MS = 1000; // reads of needed records, at most once every FLUSH_MS
  const FETCH_EACH = 5; // more needed records than this: read the listed pages again
  const PAGE_SIZE = 50;
  const TERMINAL = new Set(["done", "failed", "cancelled"]);
  const CAN_CANCEL = new Set(["queued", "running"]);
  const CAN_RETRY = new Set(["failed", "cancelled"]);
  const KEY_TOKEN = "pgjobs.token";
  const KEY_COMPANY = "pgjobs.company";
  const KEY_OPERATOR = "pgjobs.operator";

  const $ = (id) => document.getElementById(id);

  // -- session ------------------------------------------------------------------------

  const session = {
    get token() { return sessionStorage.getItem(KEY_TOKEN); },
    get company() { return sessionStorage.getItem(KEY_COMPANY); },
    get operator() { return sessionStorage.getItem(KEY_OPERATOR) === "1"; },
    // An operator looking at every company at once (no company chosen).
    get all() { return this.operator && !this.company; },
    save(token, company, operator) {
      sessionStorage.setItem(KEY_TOKEN, token);
      sessionStorage.setItem(KEY_COMPANY, company);
      sessionStorage.setItem(KEY_OPERATOR, operator ? "1" : "0");
    },
    clear() {
      sessionStorage.removeItem(KEY_TOKEN);
      sessionStorage.removeItem(KEY_COMPANY);
      sessionStorage.removeItem(KEY_OPERATOR);
    },
  };

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function api(method, path, body, token = session.token) {
    const headers = { Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    let data = null;
    if ((response.headers.get("content-type") || "").includes("json")) {
      data = await response.json();
    }
    if (!response.ok) {
      if (response.status === 401 && token === session.token) signOut("Your token was refused.");
      throw new ApiError(response.status, (data && data.error) || response.statusText);
    }
    return { data, headers: response.headers };
  }

  const companyPath = (company = session.company) =>
    `/api/companies/${encodeURIComponent(company)}`;
  const jobPath = (jobId, company) =>
    `${companyPath(company)}/content-jobs/${encodeURIComponent(jobId)}`;

  async function streamToken(jobId) {
    const body = jobId ? { jobId } : {};
    const { data } = await api("POST", `${companyPath()}/stream-tokens`, body);
    return data.token;
  }

  // -- small DOM helpers ----------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function badge(status) {
    return el("span", { class: `badge ${status}`, text: status });
  }

  function timeEl(iso) {
    if (!iso) return document.createTextNode("—");
    const date = new Date(iso);
    return el("time", { datetime: iso, title: iso, text: date.toLocaleString() });
  }

  // A duration for people: "850 ms", "12.3 s", "4 min 5 s", "2 h 3 min".
  function humanDuration(ms) {
    if (!Number.isFinite(ms) || ms < 0) return "—";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }

  // How long the job ran (started to finished), or has been running so far; "—" for a
  // job that has not started, or whose start the row does not know yet.
  function durationText(job, now = Date.now()) {
    if (!job.startedAt) return "—";
    const start = new Date(job.startedAt).getTime();
    if (job.finishedAt) return humanDuration(new Date(job.finishedAt).getTime() - start);
    if (job.status === "running") return humanDuration(now - start);
    return "—";
  }

  function progressEl(progress, status) {
    const wrap = el("div", { class: "progress" });
    const fraction = progress && typeof progress.fraction === "number" ? progress.fraction : null;
    if (fraction === null && status !== "running") {
      wrap.textContent = status === "done" ? "100%" : "—";
      return wrap;
    }
    const bar = el("progress", { max: "1", "aria-label": "Progress" });
    if (fraction !== null) {
      bar.value = fraction;
      bar.setAttribute("aria-valuetext", `${Math.round(fraction * 100)}%`);
    }
    wrap.append(bar);
    const text = [fraction !== null ? `${Math.round(fraction * 100)}%` : "", progress && progress.message]
      .filter(Boolean).join(" · ");
    if (text) wrap.append(el("small", { text }));
    return wrap;
  }

  // The end of the id: ids are UUIDv7, whose first digits are the creation time and the
  // same for every job created in the same moment.
  const shortId = (id) => id.slice(-8);

  async function copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "copied";
    } catch {
      button.textContent = "copy failed";
    }
    setTimeout(() => { button.textContent = "copy"; }, 1500);
  }

  // -- confirmation -------------------------------------------------------------------

  function confirmAction(text, label) {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    $("confirm-yes").textContent = label;
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
      dialog.returnValue = "";
      dialog.showModal();
      $("confirm-no").focus();
    });
  }

  async function act(job, action) {
    const verb = action === "cancel" ? "Cancel" : "Retry";
    const ok = await confirmAction(`${verb} job ${shortId(job.id)} (${job.jobType})?`, `${verb} job`);
    if (!ok) return;
    try {
      const { data } = await api("POST", `${jobPath(job.id, job.companyId)}/${action}`);
      jobs.upsert(data, true);
      if (detail.job && detail.job.id === data.id) detail.applyJob(data);
      say(`${verb === "Cancel" ? "Cancelled" : "Retried"} ${shortId(job.id)}.`);
    } catch (error) {
      say(`${verb} failed: ${error.message}`);
    }
  }

  // Operators: the failed jobs of the current type and source task filters, queued again
  // in one audited statement (at most 1,000), once the count has been confirmed.
  async function retryFailed() {
    const filters = {};
    if (jobs.typeFilter) filters.jobType = jobs.typeFilter;
    if (jobs.sourceFilter) filters.sourceTaskId = jobs.sourceFilter;
    const path = `${companyPath()}/retry-failed`;
    let counted;
    try {
      ({ data: counted } = await api("POST", path, { ...filters, dryRun: true }));
    } catch (error) {
      say(`Could not count the failed jobs: ${error.message}`);
      return;
    }
    if (counted.failed === 0) { say("No failed jobs match the filters."); return; }
    const n = Math.min(counted.failed, counted.limit);
    const scope = [filters.jobType, filters.sourceTaskId && `source task ${filters.sourceTaskId}`]
      .filter(Boolean).join(", ");
    const more = counted.failed > n ? ` (${counted.failed} match; the oldest ${n} now)` : "";
    const ok = await confirmAction(
      `Queue ${n} failed job${n === 1 ? "" : "s"}${scope ? ` (${scope})` : ""} again?${more}`,
      `Retry ${n}`);
    if (!ok) return;
    try {
      const { data } = await api("POST", path, filters);
      say(`Queued ${data.retried} failed job${data.retried === 1 ? "" : "s"} again.`);
    } catch (error) {
      say(`Retry failed: ${error.message}`);
    }
  }

  function actionButtons(job) {
    return el("div", { class: "actions" },
      el("button", {
        type: "button", class: "cancel", text: "Cancel",
        "aria-label": `Cancel job ${shortId(job.id)}`,
        disabled: !CAN_CANCEL.has(job.status),
        onclick: () => act(job, "cancel"),
      }),
      el("button", {
        type: "button", class: "retry", text: "Retry",
        "aria-label": `Retry job ${shortId(job.id)}`,
        disabled: !CAN_RETRY.has(job.status),
        onclick: () => act(job, "retry"),
      }),
    );
  }

  function say(text) { $("jobs-message").textContent = text; }

  // -- the live indicator -------------------------------------------------------------

  function setLive(state) {
    const node = $("live");
    node.className = `live ${state === "live" ? "live-on" : state}`;
    node.textContent = state === "reconnecting" ? "reconnecting…" : state;
    node.dataset.state = state;
  }

  // -- applying an event to a job record -----------------------------------------------

  // A record as the list API gives it, moved forward by one event of the stream (the
  // same changes the transition made to the row; see src/pgjobs/queries.sql).
  function advance(job, event) {
    const next = { ...job, status: event.status, attempts: event.attempt, seq: event.seq };
    const kind = event.type;
    if (event.progress) next.progress = event.progress;
    else if (kind !== "content_job.progress") next.progress = null;
    const reopened = kind === "content_job.retrying" && TERMINAL.has(job.status);
    if (event.errorMessage !== undefined) next.errorMessage = event.errorMessage;
    else if (event.status === "done" || reopened) next.errorMessage = null;
    if (event.resultAssetId) next.resultAssetId = event.resultAssetId;
    else if (reopened) next.resultAssetId = null;
    if (kind === "content_job.retrying") {
      next.maxAttempts = Math.max(job.maxAttempts, event.attempt + 1);
      next.finishedAt = null; // every way back to queued clears finished_at
    }
    next.partial = true; // what events say; the record may have more (times, result)
    if (kind === "content_job.running") {
      // A new attempt: its start time comes with the record (jobs.refresh).
      next.startedAt = null;
      next.finishedAt = null;
    }
    return next;
  }

  // -- the jobs table -----------------------------------------------------------------

  const jobs = {
    rows: new Map(), // id -> {job, tr}
    order: [], // ids, newest first
    dirty: new Set(),
    fetching: new Set(),
    refreshing: new Set(), // rows being read again for their times
    refreshAgain: new Set(), // ... and moved again by an event meanwhile
    needs: new Set(), // jobs to read a record of at the next flush
    needTimer: null,
    lastFlush: -Infinity,
    resyncing: false,
    resyncAgain: false,
    oldestListed: null, // the oldest record the last listing read
    filter: "", // a status, or "" for all
    typeFilter: "", // a job type, or ""
    sourceFilter: "", // a source task id, or ""
    nextCursor: null,
    loaded: 0,
    renderTimer: null,
    lastRender: 0,
    generation: 0, // bumped on reset: answers for an older table are dropped

    reset() {
      this.generation += 1;
      this.rows.clear();
      this.order = [];
      this.dirty.clear();
      this.nextCursor = null;
      this.loaded = 0;
      $("job-rows").replaceChildren();
    },

    visible(job) {
      return (!this.filter || job.status === this.filter)
        && (!this.typeFilter || job.jobType === this.typeFilter)
        && (!this.sourceFilter || job.sourceTaskId === this.sourceFilter);
    },

    // Older than the oldest listed job while older pages exist: it will come with them.
    beyondLoaded(job) {
      if (this.nextCursor === null || this.order.length === 0) return false;
      const last = this.rows.get(this.order[this.order.length - 1]).job;
      return newer(last, job);
    },

    // A job record (``record``: as the API gave it) or a row moved on by an event. A row
    // takes only a newer state; a record of the same state replaces a row that events
    // built (it has the times and the result they do not carry).
    upsert(job, record = false) {
      const row = this.rows.get(job.id);
      if (row && row.job.seq > job.seq) return;
      if (row && row.job.seq === job.seq && !(record && row.job.partial)) return;
      if (!this.visible(job)) {
        if (row) this.remove(job.id);
        return;
      }
      if (row) {
        row.job = job;
      } else {
        this.rows.set(job.id, { job, tr: null });
        insertSorted(this.order, job.id, (id) => this.rows.get(id).job);
      }
      this.dirty.add(job.id);
      this.schedule();
    },

    remove(id) {
      const row = this.rows.get(id);
      if (!row) return;
      this.rows.delete(id);
      this.order.splice(this.order.indexOf(id), 1);
      if (row.tr) row.tr.remove();
    },

    onEvent(event) {
      const row = this.rows.get(event.jobId);
      if (row) {
        if (event.seq <= row.job.seq) return; // already shown, or older than what is
        this.upsert(advance(row.job, event));
        if (TIMED.has(event.status)) this.need(event.jobId);
        return;
      }
      if (this.filter && event.status !== this.filter) return;
      this.need(event.jobId);
    },

    need(jobId) {
      this.needs.add(jobId);
      if (this.needTimer !== null) return;
      const wait = Math.max(0, this.lastFlush + FLUSH_MS - performance.now());
      this.needTimer = setTimeout(() => this.flushNeeds(), wait);
    },

    flushNeeds() {
      this.needTimer = null;
      this.lastFlush = performance.now();
      const ids = [...this.needs];
      this.needs.clear();
      if (ids.length > FETCH_EACH) { this.resyncSoon(); return; }
      for (const id of ids) {
        if (this.rows.has(id)) this.refresh(id);
        else this.fetchOne(id);
      }
    },

    // One resync at a time; asked again meanwhile, one more after it.
    async resyncSoon() {
      if (this.resyncing) { this.resyncAgain = true; return; }
      this.resyncing = true;
      try {
        do {
          this.resyncAgain = false;
          await this.resync();
        } while (this.resyncAgain);
      } catch (error) {
        say(`Could not load jobs: ${error.message}`);
      } finally {
        this.resyncing = false;
      }
    },

    async fetchOne(jobId) {
      if (this.fetching.has(jobId)) return;
      this.fetching.add(jobId);
      const generation = this.generation;
      try {
        const { data } = await api("GET", jobPath(jobId));
        if (generation === this.generation && !this.beyondLoaded(data)) this.upsert(data, true);
      } catch (error) {
        if (error.status !== 404) console.warn("job", jobId, error.message);
      } finally {
        this.fetching.delete(jobId);
      }
    },

    // Read a listed job again for what its events do not carry (startedAt, finishedAt,
    // result): one read per job at a time; an event that arrives meanwhile asks for one
    // more. The record replaces the row if it is at least as new (same seq: the same
    // state, with its times).
    async refresh(jobId) {
      if (this.refreshing.has(jobId)) { this.refreshAgain.add(jobId); return; }
      this.refreshing.add(jobId);
      const generation = this.generation;
      try {
        do {
          this.refreshAgain.delete(jobId);
          let data;
          try {
            ({ data } = await api("GET", jobPath(jobId)));
          } catch (error) {
            if (error.status !== 404) console.warn("job", jobId, error.message);
            return;
          }
          if (generation !== this.generation) return;
          if (this.rows.has(jobId)) this.upsert(data, true);
        } while (this.refreshAgain.has(jobId));
      } finally {
        this.refreshing.delete(jobId);
      }
    },

    async loadPage(cursor) {
      const generation = this.generation;
      if (!cursor) this.oldestListed = null;
      const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
      if (this.filter) params.set("status", this.filter);
      if (this.typeFilter) params.set("jobType", this.typeFilter);
      if (this.sourceFilter) params.set("sourceTaskId", this.sourceFilter);
      if (cursor) params.set("cursor", cursor);
      const { data, headers } = await api("GET", `${companyPath()}/content-jobs?${params}`);
      if (generation !== this.generation) return;
      if (cursor || this.loaded === 0) this.nextCursor = headers.get("X-Next-Cursor");
      this.loaded += data.length;
      if (data.length) this.oldestListed = data[data.length - 1];
      for (const job of data) this.upsert(job, true);
      $("no-jobs").hidden = this.order.length > 0 || data.length > 0;
      $("load-older").hidden = !this.nextCursor;
    },

    // Read every listed job again (after the stream restarted without Last-Event-ID, or
    // for a burst of events): the same number of pages, newest first. Rows older than
    // the oldest one read then leave the table while older pages exist (they come back
    // with "Load older jobs"), so the table keeps the size it had, however many jobs
    // arrive.
    async resync() {
      const want = Math.max(this.loaded, PAGE_SIZE);
      const generation = this.generation;
      this.loaded = 0;
      this.oldestListed = null;
      let cursor = null;
      do {
        await this.loadPage(cursor);
        cursor = this.nextCursor;
      } while (cursor && this.loaded < want && generation === this.generation);
      const oldest = this.oldestListed;
      if (generation !== this.generation || !this.nextCursor || !oldest) return;
      const older = this.order.filter((id) => newer(oldest, this.rows.get(id).job));
      for (const id of older) this.remove(id);
    },

    schedule() {
      if (this.renderTimer !== null) return;
      const wait = Math.max(0, this.lastRender + RENDER_MS - performance.now());
      this.renderTimer = setTimeout(() => this.render(), wait);
    },

    // A running job's duration grows: its cell is rewritten every second (text only).
    tickDurations() {
      const now = Date.now();
      for (const tr of $("job-rows").querySelectorAll("tr[data-status=running]")) {
        const row = this.rows.get(tr.dataset.jobId);
        const cell = tr.querySelector("td.duration > div");
        if (row && cell) cell.textContent = durationText(row.job, now);
      }
    },

    render() {
      this.renderTimer = null;
      this.lastRender = performance.now();
      const tbody = $("job-rows");
      for (const id of this.dirty) {
        const row = this.rows.get(id);
        if (!row) continue;
        const tr = jobRow(row.job);
        if (row.tr) row.tr.replaceWith(tr);
        row.tr = tr;
      }
      // Place rows in order; only moved or new rows are touched.
      let previous = null;
      for (const id of this.order) {
        const tr = this.rows.get(id).tr;
        if (!tr) continue;
        const expected = previous ? previous.nextSibling : tbody.firstChild;
        if (expected !== tr) tbody.insertBefore(tr, expected);
        previous = tr;
      }
      this.dirty.clear();
      $("no-jobs").hidden = this.order.length > 0;
    },
  };

  // Newest first: created_at, then id, descending (the list API's order).
  function newer(a, b) {
    if (a.createdAt !== b.createdAt) return a.createdAt > b.createdAt;
    return a.id > b.id;
  }

  function insertSorted(order, id, get) {
    const job = get(id);
    let lo = 0;
    let hi = order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (newer(get(order[mid]), job)) lo = mid + 1;
      else hi = mid;
    }
    order.splice(lo, 0, id);
  }

  // A queued job whose type no live worker claims stays queued until one starts: say so.
  // (`servedBy` comes with records, not events: a row moved back to queued by an event
  // keeps what its record said.)
  function unserved(job) {
    if (job.status !== "queued" || job.servedBy !== 0) return null;
    return el("small", { class: "unserved", text: "no live worker for this type" });
  }

  const TIMED = new Set(["running", "done", "failed", "cancelled"]); // statuses that set a time

  function jobRow(job) {
    const copyButton = el("button", {
      type: "button", text: "copy", "aria-label": `Copy job id ${job.id}`,
    });
    copyButton.addEventListener("click", () => copy(job.id, copyButton));
    const href = `#/jobs/${encodeURIComponent(job.companyId)}/${encodeURIComponent(job.id)}`;
    const attempt = `${job.attempts} / ${job.maxAttempts}`;
    // One wrapper per cell: on a narrow screen a cell is a grid of its label and this.
    const cell = (label, cls, ...children) =>
      el("td", { "data-label": label, class: cls }, el("div", {}, ...children));
    const tr = el("tr", { "data-job-id": job.id, "data-status": job.status, "data-seq": String(job.seq) },
      cell("Id", "id-cell",
        el("a", { href, class: "mono", title: job.id, "aria-label": `Job ${job.id}`, text: shortId(job.id) }),
        copyButton),
      cell("Type", "type", document.createTextNode(job.jobType)),
      cell("Status", "status", badge(job.status), unserved(job)),
      cell("Attempt", "attempt", document.createTextNode(attempt)),
      cell("Progress", "progress-cell", progressEl(job.progress, job.status)),
      cell("Source task", "source", document.createTextNode(job.sourceTaskId || "—")),
      cell("Created", "created", timeEl(job.createdAt)),
      cell("Started", "started", timeEl(job.startedAt)),
      cell("Finished", "finished", timeEl(job.finishedAt)),
      cell("Duration", "duration", document.createTextNode(durationText(job))),
      cell("Error", "error-cell", document.createTextNode(job.errorMessage || "")),
      cell("Actions", "actions-cell", actionButtons(job)),
    );
    return tr;
  }

  // -- the overview: counts per job type ---------------------------------------------

  // Read again a moment after events arrive (at most every OVERVIEW_MS), and every
  // OVERVIEW_IDLE_MS without any (scheduled jobs fall due with no event).
  const OVERVIEW_MS = 2000;
  const OVERVIEW_IDLE_MS = 15000;

  function humanAge(iso) {
    if (!iso) return "—";
    const seconds = Math.max(0, (Date.now() - new Date(iso).getTime()) / 1000);
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  const overview = {
    timer: null,
    async refresh() {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.refresh(), OVERVIEW_IDLE_MS);
      if (!session.token) return;
      let stats;
      let served;
      try {
        if (session.all) {
          // Every company (operators): the types served are those of the live workers.
          ({ data: stats } = await api("GET", "/api/stats"));
          served = [...new Set((await this.workers()).flatMap((w) => w.jobTypes))];
        } else {
          ({ data: stats } = await api("GET", `${companyPath()}/stats`));
          ({ data: { jobTypes: served } } = await api("GET", `${companyPath()}/job-types`));
        }
      } catch {
        return; // the table keeps the last figures; the next tick tries again
      }
      this.chart(stats.completionsPerMinute);
      if (session.all) {
        this.companies(stats.companies);
        picker.fill(stats.companies.map((c) => c.companyId));
      } else if (session.operator) {
        this.workers();
      }
      const rows = stats.jobTypes.map((t) => {
        const tr = el("tr", { "data-job-type": t.jobType },
          el("th", { scope: "row", text: t.jobType }));
        const labels = { queued: "queued", scheduled: "scheduled", running: "running",
          done: "done (1 h)", failed: "failed (1 h)" };
        for (const [key, label] of Object.entries(labels)) {
          tr.append(el("td", { "data-label": label, class: key, text: String(t[key]) }));
        }
        tr.append(el("td", { "data-label": "oldest queued", class: "oldest",
          title: t.oldestQueuedAt || "", text: humanAge(t.oldestQueuedAt) }));
        if (t.queued + t.scheduled > 0 && !served.includes(t.jobType)) {
          tr.classList.add("unserved");
          tr.firstChild.append(el("div", { class: "unserved-note", text: "no live worker" }));
        }
        return tr;
      });
      $("overview-rows").replaceChildren(...rows);
      this.types(stats.jobTypes.map((t) => t.jobType).concat(served));
    },
    // The job type filter offers every type the overview knows (and keeps the chosen one).
    types(names) {
      const select = $("type-filter");
      const known = [...new Set(names.concat(jobs.typeFilter ? [jobs.typeFilter] : []))].sort();
      const have = [...select.options].slice(1).map((o) => o.value);
      if (have.join("\n") === known.join("\n")) return;
      select.replaceChildren(el("option", { value: "", text: "all" }),
        ...known.map((t) => el("option", { value: t, text: t })));
      select.value = jobs.typeFilter;
    },

    // Bars drawn as SVG elements, so the chart needs no library and no inline style.
    chart(perMinute) {
      const svg = $("completions");
      const ns = "http://www.w3.org/2000/svg";
      const top = Math.max(1, ...perMinute);
      const width = 600 / perMinute.length;
      const bars = perMinute.map((n, i) => {
        const height = (n / top) * 76;
        const bar = document.createElementNS(ns, "rect");
        bar.setAttribute("x", String(i * width + 1));
        bar.setAttribute("y", String(80 - height));
        bar.setAttribute("width", String(Math.max(1, width - 2)));
        bar.setAttribute("height", String(height));
        const title = document.createElementNS(ns, "title");
        const ago = perMinute.length - 1 - i;
        title.textContent = `${n} done ${ago === 0 ? "this minute" : `${ago} min ago`}`;
        bar.append(title);
        return bar;
      });
      svg.replaceChildren(...bars);
      const total = perMinute.reduce((a, b) => a + b, 0);
      svg.dataset.total = String(total);
      $("completions-caption").textContent =
        `Completions per minute, last hour: ${total} in all, at most ${Math.max(0, ...perMinute)} a minute`;
    },

    // Every company's totals (operators, all companies), each name opening that company.
    companies(list) {
      $("companies-panel").hidden = false;
      $("company-rows").replaceChildren(...list.map((c) => {
        const tr = el("tr", { "data-company-id": c.companyId },
          el("th", { scope: "row" }, el("button", {
            type: "button", class: "link", text: c.companyId,
            onclick: () => picker.choose(c.companyId),
          })));
        const labels = { queued: "queued", scheduled: "scheduled", running: "running",
          done: "done (1 h)", failed: "failed (1 h)" };
        for (const [key, label] of Object.entries(labels)) {
          tr.append(el("td", { "data-label": label, class: key, text: String(c.totals[key]) }));
        }
        const oldest = c.jobTypes.map((t) => t.oldestQueuedAt).filter(Boolean).sort()[0] || null;
        tr.append(el("td", { "data-label": "oldest queued", class: "oldest",
          title: oldest || "", text: humanAge(oldest) }));
        return tr;
      }));
    },

    // The live workers (operators); also returned, for the types they serve.
    async workers() {
      let workers;
      try {
        ({ data: workers } = await api("GET", "/api/workers"));
      } catch {
        return [];
      }
      $("workers-panel").hidden = false;
      $("worker-rows").replaceChildren(...workers.map((w) => el("tr", { "data-worker-id": w.id },
        el("th", { scope: "row", text: w.hostname }),
        el("td", { "data-label": "pid", text: String(w.pid) }),
        el("td", { "data-label": "job types", text: w.jobTypes.join(", ") }),
        el("td", { "data-label": "running", text: `${w.running} / ${w.concurrency}` }),
        el("td", { "data-label": "heartbeat", title: w.lastHeartbeatAt,
          text: `${humanAge(w.lastHeartbeatAt)} ago` }))));
      return workers;
    },

    poke() {
      if (this.soon) return;
      this.soon = setTimeout(() => { this.soon = null; this.refresh(); }, OVERVIEW_MS);
    },
    stop() {
      clearTimeout(this.timer);
      clearTimeout(this.soon);
      this.soon = null;
      $("overview-rows").replaceChildren();
      $("worker-rows").replaceChildren();
      $("workers-panel").hidden = true;
      $("company-rows").replaceChildren();
      $("companies-panel").hidden = true;
      $("completions").replaceChildren();
    },
  };

  // -- the company stream ---------------------------------------------------------------

  const EVENT_NAME = "status"; // every frame of the company stream is named so

  const live = {
    active: false,
    run: 0, // bumped by every start and stop: a start that was overtaken gives up
    source: null,
    retryTimer: null,

    async start() {
      this.stop();
      this.active = true;
      const run = this.run;
      setLive("reconnecting");
      let token;
      try {
        token = await streamToken();
      } catch (error) {
        if (error.status !== 401 && run === this.run) this.later();
        return;
      }
      if (run !== this.run) return; // signed out or restarted meanwhile
      const url = `${companyPath()}/events?streamToken=${encodeURIComponent(token)}`;
      const source = new EventSource(url);
      this.source = source;
      let resumable = false; // whether EventSource has a Last-Event-ID to resume from
      const onEvent = (e) => {
        if (this.source !== source) return;
        resumable = true;
        jobs.onEvent(JSON.parse(e.data));
        overview.poke();
      };
      source.addEventListener(EVENT_NAME, onEvent);
      source.onopen = () => {
        if (this.source !== source) return;
        setLive("live");
        if (!resumable) {
          // A stream without Last-Event-ID starts from now: read the listed jobs again;
          // the seq check keeps whichever of a record and an event is newer.
          jobs.resyncSoon();
        }
      };
      source.onerror = () => {
        if (this.source !== source) return;
        if (source.readyState === EventSource.CLOSED) {
          // Refused (an expired stream token, most likely): start a new stream.
          setLive("offline");
          this.later();
        } else {
          setLive("reconnecting"); // EventSource resumes with Last-Event-ID itself
        }
      };
    },

    later() {
      clearTimeout(this.retryTimer);
      const run = this.run;
      this.retryTimer = setTimeout(() => { if (run === this.run) this.start(); }, 2000);
    },

    stop() {
      this.active = false;
      this.run += 1;
      clearTimeout(this.retryTimer);
      if (this.source) this.source.close();
      this.source = null;
      setLive("offline");
    },
  };

  // -- the job detail view --------------------------------------------------------------

  // A job stream read with fetch (it can send Authorization and Last-Event-ID: 0, so the
  // stream replays the whole history, then follows the job live until it ends).
  function parseSse(text, onFrame) {
    // Returns the unparsed tail; frames end with a blank line.
    const parts = text.split(/\r\n\r\n|\n\n|\r\r/);
    const tail = parts.pop();
    for (const part of parts) {
      const frame = { event: "message", id: null, data: [], retry: null };
      for (const line of part.split(/\r\n|\n|\r/)) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "event") frame.event = value;
        else if (name === "id") frame.id = value;
        else if (name === "data") frame.data.push(value);
        else if (name === "retry") frame.retry = Number(value);
      }
      onFrame(frame);
    }
    return tail;
  }

  const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
  const PREVIEWABLE = /^image\/(png|jpeg|gif|webp|svg\+xml)$/;
  const PREVIEW_MAX_BYTES = 10 * 1024 * 1024;

  const detail = {
    job: null,
    controller: null,
    lastSeq: 0,
    retryTimer: null,

    async open(company, jobId) {
      this.close();
      for (const id of ["d-id", "d-type", "d-status", "d-attempt", "d-progress", "d-source",
        "d-company", "d-created", "d-started", "d-finished", "d-error", "d-asset", "d-input",
        "d-result", "d-actions", "d-timeline"]) $(id).replaceChildren();
      $("d-id").textContent = jobId;
      let job;
      try {
        ({ data: job } = await api("GET", jobPath(jobId, company)));
      } catch (error) {
        $("d-error").textContent = error.status === 404 ? "Job not found" : error.message;
        return;
      }
      this.applyJob(job);
      await this.loadTimeline(job);
      if (this.job && this.job.id === job.id) this.follow(job, this.shownSeq);
    },

    // The timeline is the audit log (GET …/timeline: each transition's time, worker and
    // payload; a failed attempt's traceback for operator tokens). The job's event stream
    // only says that more has happened; the rows come from the timeline, after the last
    // one shown, so each appears once and in order.
    shownSeq: 0,
    loading: null,
    loadingId: null,
    again: false,

    async loadTimeline(job) {
      if (this.loading && this.loadingId === job.id) { this.again = true; return this.loading; }
      const run = (async () => {
        do {
          this.again = false;
          let more = true;
          while (more && this.job && this.job.id === job.id) {
            const path = `${jobPath(job.id, job.companyId)}/timeline?after=${this.shownSeq}`;
            let response;
            try {
              response = await api("GET", path);
            } catch {
              return; // shown again on the next event, or when the view reopens
            }
            if (!this.job || this.job.id !== job.id) return;
            for (const row of response.data) this.addTimeline(row);
            more = response.headers.get("X-Next-Cursor") !== null;
          }
        } while (this.again && this.job && this.job.id === job.id);
      })();
      this.loading = run;
      this.loadingId = job.id;
      try { await run; } finally { if (this.loading === run) this.loading = null; }
    },

    applyJob(job) {
      if (this.job && this.job.id === job.id && this.job.seq > job.seq) return;
      this.job = job;
      $("d-id").textContent = job.id;
      $("d-type").textContent = job.jobType;
      $("d-status").replaceChildren(badge(job.status));
      $("d-attempt").textContent = `${job.attempts} / ${job.maxAttempts}`;
      $("d-progress").replaceChildren(progressEl(job.progress, job.status));
      $("d-source").textContent = job.sourceTaskId || "—";
      $("d-company").textContent = job.companyId;
      $("d-created").replaceChildren(timeEl(job.createdAt));
      $("d-started").replaceChildren(timeEl(job.startedAt));
      $("d-finished").replaceChildren(timeEl(job.finishedAt));
      $("d-error").textContent = job.errorMessage || "—";
      $("d-input").textContent = JSON.stringify(job.input, null, 2);
      $("d-result").textContent = job.result === null ? "—" : JSON.stringify(job.result, null, 2);
      $("d-actions").replaceChildren(actionButtons(job));
      this.showAsset(job);
    },

    async showAsset(job) {
      const target = $("d-asset");
      if (!job.resultAssetId) { target.textContent = "—"; return; }
      if (target.dataset.assetId === job.resultAssetId) return;
      target.dataset.assetId = job.resultAssetId;
      const path = `${companyPath(job.companyId)}/assets/${encodeURIComponent(job.resultAssetId)}`;
      try {
        const { data: asset } = await api("GET", path);
        const button = el("button", {
          type: "button", text: `Download ${asset.originalFilename || "asset"}`,
        });
        button.addEventListener("click", () => download(`${path}/content`, asset.originalFilename || asset.id));
        target.replaceChildren(
          button,
          el("div", { class: "mono", text: `${asset.contentType}, ${asset.byteSize} bytes, sha256 ${asset.sha256}` }),
        );
        if (PREVIEWABLE.test(asset.contentType) && asset.byteSize <= PREVIEW_MAX_BYTES) {
          this.preview(`${path}/content`, asset, target);
        }
      } catch (error) {
        target.textContent = error.message;
      }
    },

    // An image (SVG included) is shown in an <img>, where it runs no script; fetched with
    // the token, since an <img> cannot send one, and shown from a blob: URL.
    async preview(path, asset, target) {
      const response = await fetch(path, { headers: { Authorization: `Bearer ${session.token}` } });
      if (!response.ok || target.dataset.assetId !== asset.id) return;
      const blob = await response.blob();
      if (target.dataset.assetId !== asset.id) return;
      if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
      this.previewUrl = URL.createObjectURL(blob);
      target.append(el("img", {
        class: "preview", src: this.previewUrl, alt: `Preview of ${asset.originalFilename || asset.id}`,
      }));
    },

    async follow(job, after) {
      this.lastSeq = after;
      const controller = new AbortController();
      this.controller = controller;
      let ended = false;
      let retryMs = 2000;
      try {
        const response = await fetch(`${jobPath(job.id, job.companyId)}/events`, {
          headers: { Authorization: `Bearer ${session.token}`, "Last-Event-ID": String(after) },
          signal: controller.signal,
          cache: "no-store",
        });
        if (response.status === 204) return; // nothing after `after`, and the job has ended
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = parseSse(buffer + decoder.decode(value, { stream: true }), (frame) => {
            if (frame.retry) retryMs = frame.retry;
            if (!frame.data.length) return;
            const event = JSON.parse(frame.data.join("\n"));
            if (event.error) { $("d-error").textContent = event.error; ended = true; return; }
            if (event.seq <= this.lastSeq) return;
            this.lastSeq = event.seq;
            if (event.seq > this.shownSeq) this.loadTimeline(job);
            if (this.job && event.seq > this.job.seq) this.applyJob(advance(this.job, event));
            if (TERMINAL.has(event.status)) ended = true;
          });
        }
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      if (controller.signal.aborted || this.controller !== controller) return;
      if (ended) {
        // The final record has what events do not carry (result, finishedAt).
        try {
          const { data } = await api("GET", jobPath(job.id, job.companyId));
          this.applyJob(data);
        } catch { /* the view keeps what the events said */ }
        return;
      }
      this.retryTimer = setTimeout(() => this.follow(job, this.lastSeq), retryMs);
    },

    addTimeline(row) {
      if (row.seq <= this.shownSeq) return;
      this.shownSeq = row.seq;
      const payload = row.payload || {};
      const parts = [`attempt ${row.attempt}`];
      if (row.workerId) parts.push(`worker ${row.workerId}`);
      if (payload.progress) {
        const { fraction, message } = payload.progress;
        if (typeof fraction === "number") parts.push(`${Math.round(fraction * 100)}%`);
        if (message) parts.push(message);
      }
      if (payload.errorMessage) parts.push(`error: ${payload.errorMessage}`);
      if (payload.resultAssetId) parts.push(`asset ${payload.resultAssetId}`);
      const item = el("li", { "data-seq": String(row.seq) },
        timeEl(row.createdAt), " ",
        el("span", { class: "seq", text: `#${row.seq} ` }),
        el("strong", { text: row.type.replace(/^content_job\./, "") }), " ",
        badge(row.status), " ",
        el("span", { text: parts.join(" · ") }));
      if (row.traceback) {
        item.append(el("details", { class: "traceback" },
          el("summary", { text: "Traceback" }),
          el("pre", { class: "mono", text: row.traceback })));
      }
      $("d-timeline").append(item);
    },

    close() {
      clearTimeout(this.retryTimer);
      if (this.controller) this.controller.abort();
      this.controller = null;
      this.job = null;
      this.shownSeq = 0;
      this.again = false;
      if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
      this.previewUrl = null;
      delete $("d-asset").dataset.assetId;
    },
  };

  async function download(path, filename) {
    const response = await fetch(path, { headers: { Authorization: `Bearer ${session.token}` } });
    if (!response.ok) { say(`Download failed: HTTP ${response.status}`); return; }
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  // -- submit -------------------------------------------------------------------------

  // A job submitted here arrives in the table like any other: by its queued event on the
  // company stream. The types offered are those some live worker serves.
  const submit = {
    async loadTypes() {
      const select = $("submit-type");
      let types = [];
      try {
        ({ data: { jobTypes: types } } = await api("GET", `${companyPath()}/job-types`));
      } catch (error) {
        $("submit-message").textContent = `Could not load job types: ${error.message}`;
        return;
      }
      const chosen = select.value;
      select.replaceChildren(...types.map((t) => el("option", { value: t, text: t })));
      if (types.includes(chosen)) select.value = chosen;
      if (!types.length) {
        select.append(el("option", { value: "", text: "no live worker serves any job type" }));
      }
    },

    parse() {
      let input;
      try {
        input = JSON.parse($("submit-input").value.trim() || "{}");
      } catch (error) {
        throw new Error(`Input is not valid JSON: ${error.message}`);
      }
      if (input === null || typeof input !== "object" || Array.isArray(input)) {
        throw new Error('Input must be a JSON object, e.g. {"title": "Launch"}');
      }
      const body = { jobType: $("submit-type").value, input };
      if (!body.jobType) throw new Error("Choose a job type.");
      const source = $("submit-source").value.trim();
      if (source) body.sourceTaskId = source;
      const priority = $("submit-priority").value.trim();
      if (priority) {
        if (!/^-?\d+$/.test(priority)) throw new Error("Priority must be a whole number.");
        body.priority = Number(priority);
      }
      const runAt = $("submit-run-at").value;
      if (runAt) {
        const when = new Date(runAt);
        if (Number.isNaN(when.getTime())) throw new Error("Run at is not a valid time.");
        body.runAt = when.toISOString();
      }
      return body;
    },

    async send(event) {
      event.preventDefault();
      const message = $("submit-message");
      let body;
      try {
        body = this.parse();
      } catch (error) {
        message.textContent = error.message;
        $("submit-input").setAttribute("aria-invalid", "true");
        return;
      }
      $("submit-input").removeAttribute("aria-invalid");
      try {
        const { data } = await api("POST", `${companyPath()}/content-jobs`, body);
        message.textContent = `Submitted ${data.jobId}.`;
      } catch (error) {
        message.textContent = `Not submitted: ${error.message}`;
      }
    },
  };

  // -- the operators' company picker ------------------------------------------------------

  // "All companies" and every company that has a job (from GET /api/stats). Choosing one
  // opens it as if the operator had signed in to it: its jobs, live from its stream.
  const picker = {
    async load() {
      try {
        const { data } = await api("GET", "/api/stats");
        this.fill(data.companies.map((c) => c.companyId));
      } catch { /* the picker keeps what it has; "All companies" lists them again */ }
    },

    // Adds to the companies listed (a company's jobs are never all gone at once).
    fill(companies) {
      const select = $("company-picker");
      const have = [...select.options].slice(1).map((o) => o.value);
      const names = [...new Set(have.concat(companies, session.company ? [session.company] : []))]
        .sort();
      if (have.join("\n") !== names.join("\n")) {
        select.replaceChildren(el("option", { value: "", text: "All companies" }),
          ...names.map((c) => el("option", { value: c, text: c })));
      }
      select.value = session.company || "";
    },

    choose(company) {
      if (company === (session.company || "")) return;
      session.save(session.token, company, true);
      live.stop();
      overview.stop();
      overview.timer = null;
      detail.close();
      jobs.reset();
      jobs.typeFilter = "";
      jobs.sourceFilter = "";
      $("type-filter").value = "";
      $("search-text").value = "";
      say("");
      if (location.hash !== "#/jobs") location.hash = "#/jobs"; // route() follows
      else route();
    },
  };

  // -- views and routing ----------------------------------------------------------------

  function show(view) {
    for (const id of ["sign-in-view", "jobs-view", "detail-view"]) $(id).hidden = id !== view;
    $("sign-out").hidden = view === "sign-in-view";
  }

  function route() {
    if (!session.token) {
      detail.close();
      show("sign-in-view");
      $("token").focus();
      return;
    }
    $("company").textContent = session.all ? "All companies" : session.company;
    $("company").hidden = session.operator; // the picker names it
    $("company-picker").hidden = !session.operator;
    if (session.operator) picker.fill([]);
    $("retry-failed").hidden = !session.operator;
    // All companies: the figures only (read again every OVERVIEW_IDLE_MS), no jobs table
    // and no stream (company streams are per company); the note says to pick a company.
    $("company-jobs").hidden = session.all;
    $("all-companies-note").hidden = !session.all;
    $("live").hidden = session.all;
    if (session.operator && !session.all) picker.load();
    if (!live.active && !session.all) live.start();
    if (!overview.timer) overview.refresh();
    if (jobs.loaded === 0 && !session.all) {
      // Also without a stream (refused, say): the list does not wait for it.
      jobs.loadPage(null).catch((error) => say(`Could not load jobs: ${error.message}`));
    }
    const match = /^#\/jobs\/([^/]+)\/([^/]+)$/.exec(location.hash);
    let target = null;
    try {
      if (match) target = [decodeURIComponent(match[1]), decodeURIComponent(match[2])];
    } catch { /* a malformed escape in a typed-in URL: show the jobs instead */ }
    if (target) {
      show("detail-view");
      detail.open(...target);
    } else {
      detail.close();
      show("jobs-view");
    }
  }

  async function signIn(event) {
    event.preventDefault();
    const token = $("token").value.trim();
    $("sign-in-error").textContent = "";
    try {
      const { data } = await api("GET", "/api/whoami", undefined, token);
      let company = data.companyId;
      if (data.operator) {
        // An operator's token acts for every company: the page opens the one named here,
        // or every company's figures (the picker switches between them).
        company = $("operator-company").value.trim();
      }
      session.save(token, company, data.operator);
    } catch (error) {
      $("sign-in-error").textContent =
        error.status === 401 ? "This token was not accepted." : `Could not sign in: ${error.message}`;
      return;
    }
    $("token").value = "";
    $("operator-company").value = "";
    jobs.reset();
    route();
  }

  function signOut(message) {
    session.clear();
    live.stop();
    overview.stop();
    overview.timer = null;
    detail.close();
    jobs.reset();
    $("company").textContent = "";
    $("company-picker").hidden = true;
    $("company-picker").replaceChildren(el("option", { value: "", text: "All companies" }));
    $("company").hidden = false;
    $("live").hidden = false;
    route();
    if (typeof message === "string") $("sign-in-error").textContent = message;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in").addEventListener("submit", signIn);
    $("submit-form").addEventListener("submit", (e) => submit.send(e));
    $("submit-panel").addEventListener("toggle", () => {
      if ($("submit-panel").open) submit.loadTypes();
    });
    $("sign-out").addEventListener("click", () => signOut());
    $("company-picker").addEventListener("change", (e) => picker.choose(e.target.value));
    const reload = () => {
      jobs.reset();
      jobs.loadPage(null).catch((error) => say(`Could not load jobs: ${error.message}`));
    };
    $("status-filter").addEventListener("change", (e) => {
      jobs.filter = e.target.value;
      reload();
    });
    $("type-filter").addEventListener("change", (e) => {
      jobs.typeFilter = e.target.value;
      reload();
    });
    // A job id opens that job; anything else lists the jobs of that source task.
    $("retry-failed").addEventListener("click", retryFailed);
    $("search").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("search-text").value.trim();
      if (UUID.test(text)) {
        location.hash = `#/jobs/${encodeURIComponent(session.company)}/${text.toLowerCase()}`;
        return;
      }
      jobs.sourceFilter = text;
      say(text ? `Jobs of source task ${text}` : "");
      reload();
    });
    $("load-older").addEventListener("click", () => {
      jobs.loadPage(jobs.nextCursor).catch((error) => say(`Could not load jobs: ${error.message}`));
    });
    setInterval(() => { if (session.token) jobs.tickDurations(); }, 1000);
    window.addEventListener("hashchange", route);
    window.addEventListener("offline", () => setLive("offline"));
    route();
  });
})();
