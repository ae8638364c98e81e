// History: every ended job in the server's store (it survives restarts), newest first, searchable by
// prompt; "send to" restores a job's parameters from its image's infotext.

import { del, get, notify } from "./api.js";

const PAGE = 30;

export class History {
  constructor(panel, app) {
    this.app = app;
    this.list = panel.querySelector("#history-list");
    this.search = panel.querySelector("#history-search");
    this.more = panel.querySelector("#history-more");
    let typing = null;
    this.search.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => this.load(), 250);
    });
    panel.querySelector("#history-refresh").addEventListener("click", () => this.load());
    this.more.addEventListener("click", () => this.load(true));
    this.last = null;
  }

  async load(next = false) {
    const q = encodeURIComponent(this.search.value.trim());
    const before = next && this.last !== null ? `&before=${this.last}` : "";
    let jobs;
    try {
      jobs = await get(`/sdapi/v2/history?q=${q}&limit=${PAGE}${before}`);
    } catch (e) {
      notify(`History: ${e.message}`);
      return;
    }
    if (!next) this.list.replaceChildren();
    for (const job of jobs) this.list.append(this.item(job));
    this.last = jobs.length ? jobs.at(-1).finished : this.last;
    this.more.hidden = jobs.length < PAGE;
    if (!next && !jobs.length) {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = this.search.value ? "No finished job has that in its prompt." : "No finished jobs yet.";
      this.list.append(li);
    }
  }

  item(job) {
    const li = document.createElement("li");
    li.className = "history-item";
    li.dataset.id = job.id;
    li.dataset.state = job.state;
    const thumb = document.createElement("div");
    thumb.className = "thumbs";
    job.images.forEach((url, i) => {
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Image ${i + 1} of: ${job.prompt.slice(0, 80)}`;
      img.loading = "lazy";
      thumb.append(img);
    });
    const text = document.createElement("div");
    text.className = "grow";
    const prompt = document.createElement("p");
    prompt.className = "prompt";
    prompt.textContent = job.prompt || "(empty prompt)";
    const meta = document.createElement("p");
    meta.className = "muted";
    const when = new Date((job.finished || job.created) * 1000).toLocaleString();
    meta.textContent = `${job.kind} · ${job.state}${job.error && job.state !== "canceled" ? `: ${job.error}` : ""} · ${when}`;
    text.append(prompt, meta);
    const buttons = document.createElement("div");
    buttons.className = "row";
    const payload = job.payloads[0] || job.request;
    for (const kind of ["txt2img", "img2img"]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = `Send to ${kind}`;
      b.addEventListener("click", () => this.app.restore(kind, payload, job.images[0]));
      buttons.append(b);
    }
    if (job.images.length) {
      const a = document.createElement("a");
      a.className = "button";
      a.href = job.images[0];
      a.download = `${job.id.slice(0, 8)}.png`;
      a.textContent = "Download";
      buttons.append(a);
    }
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Delete";
    remove.addEventListener("click", async () => {
      try {
        await del(`/sdapi/v2/history/${job.id}`);
        li.remove();
      } catch (e) {
        notify(`Delete failed: ${e.message}`);
      }
    });
    buttons.append(remove);
    text.append(buttons);
    li.append(thumb, text);
    return li;
  }
}
