// A tab's jobs: submitted to /sdapi/v2/jobs, followed with their place in the queue, step and preview,
// canceled with DELETE; finished images shown with their infotext.

import { ApiError, del, get, notify, post } from "./api.js";

const POLL_MS = 300;
const MAX_POLL_ERRORS = 20; // then the job is dropped from the list with a message

export class JobList {
  constructor(list, preview, onDone) {
    this.list = list; // the <ul> of this tab's jobs
    this.preview = preview; // the <img> of the running job's current image
    this.onDone = onDone; // (job) for a finished job
    this.jobs = new Map(); // id -> {row, errors}
    this.timer = null;
  }

  async submit(kind, payload) {
    const job = await post("/sdapi/v2/jobs", { kind, ...payload });
    this.track(job);
    return job.id;
  }

  // follows a job already queued (`job`: at least its id); `onDone` instead of the list's own
  track(job, onDone = null, label = "") {
    const row = document.createElement("li");
    row.className = "job";
    row.dataset.id = job.id;
    row.innerHTML = `<span class="state" aria-live="polite"></span>
      <progress max="1" value="0" aria-label="Job progress"></progress>
      <button type="button" class="cancel">Cancel</button>`;
    row.querySelector(".cancel").addEventListener("click", () => this.cancel(job.id));
    if (label) row.querySelector(".state").dataset.label = label;
    this.list.prepend(row);
    this.jobs.set(job.id, { row, errors: 0, onDone });
    this.show({ state: "pending", position: null, ...job });
    this.schedule();
  }

  async cancel(id) {
    const entry = this.jobs.get(id);
    if (!entry) return;
    entry.row.querySelector(".cancel").disabled = true;
    try {
      await del(`/sdapi/v2/jobs/${id}`);
      entry.row.querySelector(".state").textContent = "Canceling…";
    } catch (e) {
      // 409: it ended meanwhile; the next poll shows how
      if (!(e instanceof ApiError && e.status === 409)) notify(`Cancel failed: ${e.message}`);
    }
  }

  schedule() {
    if (this.timer === null && this.jobs.size) this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  async poll() {
    this.timer = null;
    let previewShown = false;
    for (const [id, entry] of [...this.jobs]) {
      try {
        const running = !previewShown;
        const job = await get(`/sdapi/v2/jobs/${id}?preview=${running}`);
        if (job.state === "running") previewShown = true;
        entry.errors = 0;
        this.show(job);
      } catch (e) {
        if (++entry.errors >= MAX_POLL_ERRORS) {
          this.jobs.delete(id);
          entry.row.querySelector(".state").textContent = `Lost: ${e.message}`;
        }
      }
    }
    this.schedule();
  }

  show(job) {
    const entry = this.jobs.get(job.id);
    if (!entry) return;
    const { row } = entry;
    const state = row.querySelector(".state");
    const bar = row.querySelector("progress");
    row.dataset.state = job.state;
    const label = state.dataset.label ? `${state.dataset.label}: ` : "";
    if (job.state === "pending") {
      state.textContent = label + (job.position ? `Queued: ${job.position} ahead` : "Queued: next");
    } else if (job.state === "running") {
      const n = job.n_iter || 1, i = job.iteration || 0;
      const frac = job.steps ? (i + job.step / job.steps) / n : 0;
      bar.value = frac;
      state.textContent = label + (job.loading ? `Loading ${job.loading}` : `Step ${job.step}/${job.steps}` + (n > 1 ? `, batch ${i + 1}/${n}` : ""));
      if (job.preview) {
        this.preview.src = `data:image/png;base64,${job.preview}`;
        this.preview.hidden = false;
      }
    } else {
      this.jobs.delete(job.id);
      row.querySelector(".cancel").remove();
      bar.value = job.state === "done" ? 1 : bar.value;
      state.textContent = label + (job.state === "done" ? "Done" : job.state === "canceled" ? "Canceled" : `Failed: ${job.error}`);
      if (job.state === "failed") notify(`Generation failed: ${job.error}`);
      if (job.state === "done") {
        this.preview.hidden = true;
        (entry.onDone || this.onDone)(job);
      } else if (!this.jobs.size) this.preview.hidden = true;
    }
  }
}
