// sdstudio's web UI: plain ES modules over the server's public API (/sdapi/v1 and /sdapi/v2), no build step.

import { get, notify } from "./api.js";
import { MaskCanvas } from "./canvas.js";
import { applyPayload, buildForm, FIXED_LISTS, readPayload } from "./form.js";
import { History } from "./history.js";
import { JobList } from "./jobs.js";
import { NetworkCards } from "./networks.js";
import { PngInfo } from "./pnginfo.js";
import { XyzPlot } from "./xyz.js";

class GenerateTab {
  constructor(panel, kind, lists, models) {
    this.kind = kind;
    this.models = models;
    this.lastSeeds = [];
    this.selected = 0;
    this.form = buildForm(kind, lists);
    const output = document.createElement("div");
    output.className = "output";
    output.innerHTML = `
      <div class="gallery" aria-label="${kind} images" role="group"></div>
      <img class="live" alt="Progress preview" hidden>
      <div class="xyz-view" aria-label="${kind} X/Y/Z plot"></div>
      <pre class="infotext" aria-label="${kind} infotext"></pre>
      <div class="row results" hidden>
        <a class="button download" download>Download</a>
        <button type="button" data-send="txt2img">Send to txt2img</button>
        <button type="button" data-send="img2img">Send to img2img</button>
      </div>
      <h2>Queue</h2>
      <ul class="queue" aria-label="${kind} jobs"></ul>`;
    panel.append(this.form, output);
    this.gallery = output.querySelector(".gallery");
    this.infotext = output.querySelector(".infotext");
    this.results = output.querySelector(".results");
    this.prompt = this.form.querySelector("[name=prompt]");
    this.jobs = new JobList(output.querySelector(".queue"), output.querySelector(".live"), (job) => this.done(job));
    this.networks = new NetworkCards(this.form.querySelector(".networks"), this.prompt);
    this.xyz = new XyzPlot(this.form.querySelector(".xyz-plot"), output.querySelector(".xyz-view"), this);
    if (kind === "img2img") {
      this.canvas = new MaskCanvas(this.form.querySelector(".canvas-slot"), (w, h) => {
        // generate at the image's own size (multiples of 8), so that unmasked pixels stay where they are
        this.form.querySelector("[name=width]").value = Math.max(8, Math.round(w / 8) * 8);
        this.form.querySelector("[name=height]").value = Math.max(8, Math.round(h / 8) * 8);
      });
    }
    this.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.generate();
    });
    this.form.querySelector("[data-action=random-seed]").addEventListener("click", () => {
      this.form.querySelector("[name=seed]").value = -1;
    });
    this.form.querySelector("[data-action=reuse-seed]").addEventListener("click", () => {
      if (this.lastSeeds.length) this.form.querySelector("[name=seed]").value = this.lastSeeds[this.selected] ?? this.lastSeeds[0];
    });
    for (const b of this.results.querySelectorAll("[data-send]")) {
      b.addEventListener("click", () => this.sendTo(b.dataset.send));
    }
  }

  payload() {
    const payload = readPayload(this.form);
    const overrides = (payload.override_settings ??= {});
    if (this.models.checkpoint.value) overrides.sd_model_checkpoint = this.models.checkpoint.value;
    if (this.models.vae.value) overrides.sd_vae = this.models.vae.value;
    if (this.kind === "img2img") {
      if (!this.canvas.hasImage) throw new Error("img2img needs a source image: upload or drop one");
      payload.init_images = [this.canvas.imageBase64()];
      if (this.canvas.hasMask()) payload.mask = this.canvas.maskBase64();
    }
    return payload;
  }

  async generate() {
    notify("");
    try {
      await this.jobs.submit(this.kind, this.payload());
    } catch (e) {
      notify(e.message);
      const el = e.field && this.form.querySelector(`[name="${e.field}"]`);
      if (el) {
        el.setAttribute("aria-invalid", "true");
        el.addEventListener("input", () => el.removeAttribute("aria-invalid"), { once: true });
        el.focus();
      }
    }
  }

  done(job) {
    this.lastSeeds = job.seeds || [];
    this.lastJob = job;
    this.gallery.replaceChildren();
    (job.images || []).forEach((_, i) => {
      const img = document.createElement("img");
      img.src = `/sdapi/v2/jobs/${job.id}/images/${i}`;
      img.alt = `Result ${i + 1}: ${(job.infotexts[i] || "").split("\n")[0].slice(0, 120)}`;
      img.tabIndex = 0;
      img.addEventListener("click", () => this.select(i));
      img.addEventListener("keydown", (e) => e.key === "Enter" && this.select(i));
      this.gallery.append(img);
    });
    this.select(0);
  }

  select(i) {
    const job = this.lastJob;
    if (!job || !job.images || !job.images.length) return;
    this.selected = i;
    [...this.gallery.children].forEach((img, k) => img.classList.toggle("selected", k === i));
    this.infotext.textContent = job.infotexts[i] || "";
    const link = this.results.querySelector(".download");
    link.href = `/sdapi/v2/jobs/${job.id}/images/${i}`;
    link.download = `${job.id.slice(0, 8)}-${i}.png`;
    this.results.hidden = false;
  }

  sendTo(kind) {
    const job = this.lastJob;
    if (!job) return;
    app.restore(kind, (job.payloads || [])[this.selected] || {}, `/sdapi/v2/jobs/${job.id}/images/${this.selected}`);
  }
}

class App {
  async start() {
    const models = { checkpoint: document.getElementById("checkpoint"), vae: document.getElementById("vae") };
    const [samplers, schedulers, upscalers, latent, checkpoints, options, vaes] = await Promise.all([
      get("/sdapi/v1/samplers"), get("/sdapi/v1/schedulers"), get("/sdapi/v1/upscalers"),
      get("/sdapi/v1/latent-upscale-modes"), get("/sdapi/v1/sd-models"), get("/sdapi/v1/options"), get("/sdapi/v1/sd-vae"),
    ]);
    const lists = {
      ...FIXED_LISTS,
      samplers: samplers.map((s) => [s.name, s.name]),
      schedulers: schedulers.map((s) => [s.name, s.label]),
      upscalers: [...latent.map((m) => [m.name, m.name]), ...upscalers.filter((u) => u.name !== "None").map((u) => [u.name, u.name])],
    };
    for (const c of checkpoints) models.checkpoint.append(new Option(c.title, c.title, false, c.title === options.sd_model_checkpoint));
    models.vae.append(new Option("Automatic", "Automatic"), new Option("None", "None"));
    for (const v of vaes) models.vae.append(new Option(v.model_name, v.model_name, false, v.model_name === options.sd_vae));
    this.models = models;
    this.checkpoints = checkpoints;
    this.tabs = {};
    for (const kind of ["txt2img", "img2img"]) {
      this.tabs[kind] = new GenerateTab(document.getElementById(`panel-${kind}`), kind, lists, models);
    }
    this.history = new History(document.getElementById("panel-history"), this);
    this.pnginfo = new PngInfo(document.getElementById("panel-pnginfo"), this);
    for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => this.show(tab.id.slice(4)));
    document.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "Enter") {
        const tab = this.tabs[this.current];
        if (tab) {
          e.preventDefault();
          tab.generate();
        }
      }
    });
    this.show("txt2img");
    document.body.dataset.ready = "true";
  }

  show(name) {
    this.current = name;
    for (const tab of document.querySelectorAll("[role=tab]")) {
      const on = tab.id === `tab-${name}`;
      tab.setAttribute("aria-selected", String(on));
      document.getElementById(tab.getAttribute("aria-controls")).hidden = !on;
    }
    if (name === "history") this.history.load();
  }

  // "send to": fills tab `kind` from a payload (the server reads it from an infotext), with `imageUrl` as
  // img2img's source image
  async restore(kind, payload, imageUrl) {
    notify("");
    try {
      const tab = this.tabs[kind];
      const missed = applyPayload(tab.form, payload);
      const model = payload.override_settings?.sd_model_checkpoint;
      if (model) {
        const hit = this.checkpoints.find((c) => c.title === model || c.model_name === model || c.title.startsWith(`${model} [`));
        if (hit) this.models.checkpoint.value = hit.title;
        else missed.push(`Model=${model}`);
      }
      const vae = payload.override_settings?.sd_vae;
      if (vae && [...this.models.vae.options].some((o) => o.value === vae)) this.models.vae.value = vae;
      if (kind === "img2img" && imageUrl) await tab.canvas.loadUrl(imageUrl);
      if (payload.width && payload.height) {
        tab.form.querySelector("[name=width]").value = payload.width;
        tab.form.querySelector("[name=height]").value = payload.height;
      }
      this.show(kind);
      if (missed.length) notify(`Not on this server, left at their defaults: ${missed.join(", ")}`, "info");
    } catch (e) {
      notify(e.message);
    }
  }
}

const app = new App();
app.start().catch((e) => notify(`The UI could not start: ${e.message}`));
