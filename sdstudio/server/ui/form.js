// The generation form of a tab: its fields are the A1111 payload fields, by name ("override_settings.X"
// for a setting), so a payload (from the form, an infotext or the history) fills it and it gives one back.

// name, label, input type, and: value (the default shown), min, max, step, options (a list's key), blank
// (the placeholder of a field left out of the payload while empty), kinds (the tabs that have it)
const MAIN = [
  { name: "sampler_name", label: "Sampling method", type: "select", options: "samplers", value: "Euler a" },
  { name: "scheduler", label: "Schedule type", type: "select", options: "schedulers" },
  { name: "steps", label: "Sampling steps", type: "number", value: 20, min: 1, max: 1000, step: 1 },
  { name: "cfg_scale", label: "CFG scale", type: "number", value: 7, min: 0, max: 30, step: 0.5 },
  { name: "width", label: "Width", type: "number", min: 8, max: 4096, step: 8, blank: "model's own" },
  { name: "height", label: "Height", type: "number", min: 8, max: 4096, step: 8, blank: "model's own" },
  { name: "batch_size", label: "Batch size", type: "number", value: 1, min: 1, max: 64, step: 1 },
  { name: "n_iter", label: "Batch count", type: "number", value: 1, min: 1, max: 100, step: 1 },
  { name: "override_settings.CLIP_stop_at_last_layers", label: "Clip skip", type: "number", min: 1, max: 12, step: 1, blank: "model's own" },
  { name: "denoising_strength", label: "Denoising strength", type: "number", value: 0.75, min: 0, max: 1, step: 0.01, kinds: ["img2img"] },
  { name: "resize_mode", label: "Resize mode", type: "select", options: "resize_modes", kinds: ["img2img"] },
];
const HIRES = [
  { name: "enable_hr", label: "Hires. fix", type: "checkbox" },
  { name: "hr_upscaler", label: "Upscaler", type: "select", options: "upscalers" },
  { name: "hr_scale", label: "Upscale by", type: "number", value: 2, min: 1, max: 4, step: 0.05 },
  { name: "hr_second_pass_steps", label: "Hires steps", type: "number", value: 0, min: 0, max: 1000, step: 1 },
  { name: "denoising_strength", label: "Hires denoising strength", type: "number", value: 0.7, min: 0, max: 1, step: 0.01 },
  { name: "hr_resize_x", label: "Resize width to", type: "number", value: 0, min: 0, max: 4096, step: 8 },
  { name: "hr_resize_y", label: "Resize height to", type: "number", value: 0, min: 0, max: 4096, step: 8 },
];
const VARIATION = [
  { name: "subseed", label: "Variation seed", type: "number", value: -1, step: 1 },
  { name: "subseed_strength", label: "Variation strength", type: "number", value: 0, min: 0, max: 1, step: 0.01 },
];
const ADVANCED = [
  { name: "eta", label: "Eta", type: "number", min: 0, max: 1, step: 0.01, blank: "sampler's own" },
  { name: "override_settings.eta_noise_seed_delta", label: "Eta noise seed delta (ENSD)", type: "number", value: 0, step: 1 },
  { name: "override_settings.token_merging_ratio", label: "Token merging ratio", type: "number", value: 0, min: 0, max: 0.75, step: 0.05 },
  { name: "override_settings.s_min_uncond", label: "Negative Guidance minimum sigma", type: "number", min: 0, step: 0.1, blank: "model's own" },
];
const INPAINT = [
  { name: "mask_blur", label: "Mask blur", type: "number", value: 4, min: 0, max: 64, step: 1 },
  { name: "inpainting_mask_invert", label: "Mask mode", type: "select", options: "mask_modes" },
  { name: "inpainting_fill", label: "Masked content", type: "select", options: "masked_contents" },
  { name: "inpaint_full_res", label: "Inpaint area", type: "select", options: "inpaint_areas" },
  { name: "inpaint_full_res_padding", label: "Only masked padding, pixels", type: "number", value: 32, min: 0, max: 256, step: 4 },
];

// lists the server does not give: value, label
export const FIXED_LISTS = {
  resize_modes: [["0", "Just resize"], ["1", "Crop and resize"], ["2", "Resize and fill"]],
  mask_modes: [["0", "Inpaint masked"], ["1", "Inpaint not masked"]],
  masked_contents: [["0", "fill"], ["1", "original"], ["2", "latent noise"], ["3", "latent nothing"]],
  inpaint_areas: [["false", "Whole picture"], ["true", "Only masked"]],
};

const id = (kind, name) => `${kind}-${name.replace(/[^\w]/g, "_")}`;

function field(kind, spec, lists, idPrefix = kind) {
  const wrap = document.createElement("div");
  wrap.className = `field field-${spec.type}`;
  const label = document.createElement("label");
  label.htmlFor = id(idPrefix, spec.name);
  label.textContent = spec.label;
  let input;
  if (spec.type === "select") {
    input = document.createElement("select");
    for (const [value, text] of lists[spec.options] || []) {
      const opt = document.createElement("option");
      opt.value = value;
      opt.textContent = text;
      input.append(opt);
    }
    if (spec.value !== undefined && [...input.options].some((o) => o.value === spec.value)) input.value = spec.value;
  } else {
    input = document.createElement("input");
    input.type = spec.type;
    for (const key of ["min", "max", "step"]) if (spec[key] !== undefined) input[key] = spec[key];
    if (spec.type === "checkbox") input.checked = Boolean(spec.value);
    else if (spec.value !== undefined) input.value = spec.value;
    if (spec.blank) input.placeholder = spec.blank;
  }
  input.id = id(idPrefix, spec.name);
  input.name = spec.name;
  input.dataset.default = spec.type === "checkbox" ? String(Boolean(spec.value)) : spec.value ?? "";
  if (spec.type === "checkbox") wrap.append(input, label);
  else wrap.append(label, input);
  return wrap;
}

function group(title, kind, specs, lists, open = false, prefix = kind) {
  const box = document.createElement("details");
  box.open = open;
  const summary = document.createElement("summary");
  summary.textContent = title;
  box.append(summary);
  const grid = document.createElement("div");
  grid.className = "grid";
  for (const spec of specs) grid.append(field(kind, spec, lists, prefix));
  box.append(grid);
  return box;
}

function smallButton(text, label, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = "icon";
  b.textContent = text;
  b.title = label;
  b.setAttribute("aria-label", label);
  b.dataset.action = action;
  return b;
}

// The form of a tab; `lists`: the option lists (samplers, schedulers, upscalers and FIXED_LISTS)
export function buildForm(kind, lists) {
  const form = document.createElement("form");
  form.className = "gen-form";
  form.setAttribute("aria-label", `${kind} parameters`);
  form.noValidate = true;

  const prompts = document.createElement("div");
  prompts.className = "prompts";
  for (const [name, label, rows] of [["prompt", "Prompt", 3], ["negative_prompt", "Negative prompt", 2]]) {
    const l = document.createElement("label");
    l.htmlFor = id(kind, name);
    l.textContent = label;
    const t = document.createElement("textarea");
    t.id = id(kind, name);
    t.name = name;
    t.rows = rows;
    t.dataset.default = "";
    t.placeholder = name === "prompt" ? "Ctrl+Enter generates" : "";
    prompts.append(l, t);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  const go = document.createElement("button");
  go.type = "submit";
  go.className = "primary";
  go.textContent = "Generate";
  actions.append(go);
  prompts.append(actions);
  form.append(prompts);

  const slot = document.createElement("div"); // img2img: the canvas goes here
  slot.className = "canvas-slot";
  form.append(slot);

  const main = document.createElement("div");
  main.className = "grid";
  for (const spec of MAIN) if (!spec.kinds || spec.kinds.includes(kind)) main.append(field(kind, spec, lists));
  // seed, with "random" and "reuse last"
  const seed = field(kind, { name: "seed", label: "Seed", type: "number", value: -1, step: 1 }, lists);
  seed.append(smallButton("Random", "Random seed", "random-seed"), smallButton("Reuse", "Reuse last seed", "reuse-seed"));
  main.append(seed);
  form.append(main);

  if (kind === "img2img") form.append(group("Inpainting", kind, INPAINT, lists, true));
  // the hires strength shares the payload name denoising_strength: its own id prefix keeps ids unique
  if (kind === "txt2img") form.append(group("Hires. fix", kind, HIRES, lists, false, "txt2img-hr"));
  form.append(group("Variation seed", kind, VARIATION, lists));
  form.append(group("Advanced", kind, ADVANCED, lists));
  const xyz = document.createElement("details");
  xyz.className = "xyz-plot";
  const xyzSummary = document.createElement("summary");
  xyzSummary.textContent = "X/Y/Z plot";
  xyz.append(xyzSummary);
  form.append(xyz);
  const networks = document.createElement("details");
  networks.className = "networks";
  const summary = document.createElement("summary");
  summary.textContent = "Extra networks";
  networks.append(summary);
  form.append(networks);
  return form;
}

function inputs(form) {
  return [...form.querySelectorAll("input[name], select[name], textarea[name]")].filter(
    (el) => !el.closest(".networks") && !el.closest(".canvas-slot") && !el.closest(".xyz-plot"),
  );
}

function setPath(obj, name, value) {
  const parts = name.split(".");
  let at = obj;
  for (const part of parts.slice(0, -1)) at = at[part] ??= {};
  at[parts.at(-1)] = value;
}

function getPath(obj, name) {
  return name.split(".").reduce((at, part) => (at == null ? undefined : at[part]), obj);
}

// The payload the form asks for: empty fields are left out (the server's default)
export function readPayload(form) {
  const payload = {};
  const hires = form.querySelector("[name=enable_hr]");
  for (const el of inputs(form)) {
    // the hires strength counts only with hires on; the img2img strength always
    if (el.id.startsWith("txt2img-hr-") && el.name !== "enable_hr" && !hires.checked) continue;
    let value;
    if (el.type === "checkbox") value = el.checked;
    else if (el.type === "number") {
      if (el.value === "") continue;
      value = Number(el.value);
    } else if (el.tagName === "SELECT" && /^(true|false)$/.test(el.value)) value = el.value === "true";
    else if (el.tagName === "SELECT" && /^\d+$/.test(el.value) && el.name !== "sampler_name") value = Number(el.value);
    else value = el.value;
    setPath(payload, el.name, value);
  }
  return payload;
}

function setValue(el, value) {
  if (el.type === "checkbox") el.checked = Boolean(value);
  else if (el.tagName === "SELECT") {
    const text = typeof value === "boolean" ? String(value) : String(value);
    const opt = [...el.options].find((o) => o.value === text || o.textContent === text);
    if (opt) el.value = opt.value;
    else return false;
  } else el.value = value == null ? "" : value;
  return true;
}

// Fills the form from a payload: fields it names get its values, the others their defaults (as A1111's
// "send to"); returns the fields it could not set (a sampler this server lacks, say)
export function applyPayload(form, payload) {
  const missed = [];
  const hiresOn = Boolean(payload.enable_hr);
  for (const el of inputs(form)) {
    let value = getPath(payload, el.name);
    if (el.id.startsWith("txt2img-hr-") && el.name === "denoising_strength" && !hiresOn) value = undefined;
    if (value === undefined) {
      const d = el.dataset.default;
      if (el.type === "checkbox") el.checked = d === "true";
      else if (el.tagName === "SELECT") {
        if (!setValue(el, d)) el.selectedIndex = 0;
      }
      else el.value = d ?? "";
      continue;
    }
    if (!setValue(el, value)) missed.push(`${el.name}=${value}`);
  }
  if (hiresOn) form.querySelector("details:has([name=enable_hr])")?.setAttribute("open", "");
  return missed;
}
