// Extra networks: a card per LoRA, embedding and hypernetwork in the server's folders; a click puts its
// tag into the tab's prompt.

import { get, notify } from "./api.js";

const KINDS = [["lora", "LoRA"], ["embedding", "Textual inversion"], ["hypernetwork", "Hypernetworks"]];
const SHOWN_METADATA = ["ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
  "ss_network_alpha", "ss_num_train_images", "ss_steps", "ss_training_comment"];

export function insertTag(textarea, tag) {
  const text = textarea.value;
  const at = textarea.selectionStart ?? text.length;
  const before = text.slice(0, at), after = text.slice(at);
  const sep = before && !/[\s,]$/.test(before) ? ", " : "";
  textarea.value = before + sep + tag + (after && !/^[\s,]/.test(after) ? ", " : "") + after;
  const caret = (before + sep + tag).length;
  textarea.setSelectionRange(caret, caret);
  textarea.dispatchEvent(new Event("input", { bubbles: true }));
}

export class NetworkCards {
  constructor(details, prompt) {
    this.details = details;
    this.prompt = prompt;
    this.body = document.createElement("div");
    this.body.className = "network-body";
    const bar = document.createElement("div");
    bar.className = "row";
    bar.innerHTML = `<label class="grow">Filter networks <input type="search" name="network-filter"></label>
      <button type="button" data-action="refresh">Refresh</button>`;
    bar.querySelector("input").addEventListener("input", (e) => this.filter(e.target.value));
    bar.querySelector("button").addEventListener("click", () => this.load());
    details.append(bar, this.body);
    details.addEventListener("toggle", () => details.open && !this.loaded && this.load());
    this.loaded = false;
  }

  async load() {
    let data;
    try {
      data = await get("/sdapi/v2/networks");
    } catch (e) {
      notify(`Extra networks: ${e.message}`);
      return;
    }
    this.loaded = true;
    this.body.replaceChildren();
    for (const [kind, title] of KINDS) {
      const section = document.createElement("section");
      const h = document.createElement("h3");
      h.textContent = `${title} (${data[kind].length})`;
      const cards = document.createElement("div");
      cards.className = "cards";
      for (const item of data[kind]) cards.append(this.card(item));
      if (!data[kind].length) {
        const p = document.createElement("p");
        p.className = "muted";
        p.textContent = "None in the server's folders.";
        cards.append(p);
      }
      section.append(h, cards);
      this.body.append(section);
    }
  }

  card(item) {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.name = item.name;
    card.setAttribute("aria-label", `Insert ${item.tag}`);
    if (item.preview) {
      const img = document.createElement("img");
      img.src = item.preview;
      img.alt = "";
      img.loading = "lazy";
      card.append(img);
    } else {
      const ph = document.createElement("div");
      ph.className = "placeholder";
      ph.textContent = item.name.slice(0, 2).toUpperCase();
      card.append(ph);
    }
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = item.name;
    card.append(name);
    const shown = SHOWN_METADATA.filter((k) => item.metadata[k]).map((k) => `${k.replace(/^ss_/, "")}: ${item.metadata[k]}`);
    card.title = [item.tag, ...shown].join("\n");
    if (shown.length) {
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = shown.slice(0, 3).join(" · ");
      card.append(meta);
    }
    card.addEventListener("click", () => insertTag(this.prompt, item.tag));
    return card;
  }

  filter(text) {
    const t = text.toLowerCase();
    for (const card of this.body.querySelectorAll(".card")) card.hidden = !card.dataset.name.toLowerCase().includes(t);
  }
}
